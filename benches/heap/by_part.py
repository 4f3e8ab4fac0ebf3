"""Live heap by part of the daemon, from heaptrack's collapsed stacks (`heaptrack_print -F`).

Each stack counts under the first part whose frame it holds, in the order below: the judge's
parts before the buckets, whose closing feeds them.
    python3 by_part.py live.txt SERIES
"""
import sys, collections
tot=collections.Counter(); total=0
rules=[('sled: metrics histograms','default (metrics.rs)'),('sled: open','open (config.rs)'),
 ('sled: cache of written records','(emit.rs)'),('/metrics rendering','(stats.rs)'),
 ('judge: sequential evidence','(sequential.rs)'),('judge: history','(history.rs)'),
 ('judge: checks','(checks'),
 ('baselines','learn (engine.rs)'),('baselines','(baseline.rs)'),
 ('catalog','(catalog.rs)'),('buckets and rolling windows','window_resource (engine.rs)'),('buckets and rolling windows','(window.rs)')]
for line in open(sys.argv[1]):
    stack,_,n=line.rstrip().rpartition(' '); n=int(n); total+=n
    for name,pat in rules:
        if pat in stack: tot[name]+=n; break
    else: tot['other']+=n
series=float(sys.argv[2])
print(f'total {total/1e6:.1f} MB')
for k,v in tot.most_common(): print(f'{v/1e6:7.2f} MB {v/series:7.0f} B/series  {k}')
