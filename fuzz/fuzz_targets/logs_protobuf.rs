//! `canaryd::fuzzing::logs_protobuf`: see its doc for what it reads and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| canaryd::fuzzing::logs_protobuf(data));
