//! Loads the analysis models from the models folder, each validated before the daemon binds a port.
//!
//! Every `*.toml` file is one model named after its stem. When the folder has no `default` model,
//! the one shipped in the binary (the repository's `models/default.toml`) stands in, so that
//! `canaryd serve` judges canaries from any working directory.

use std::path::{Path, PathBuf};

use canaryd_engine::judge::{DEFAULT_MODEL, Model};

/// The shipped default model.
pub const EMBEDDED_DEFAULT: &str = include_str!("../models/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    #[error("cannot read models_dir {path}: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("cannot read model {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// A TOML syntax error, an unknown field or a value of the wrong type; toml's message names
    /// the key and the line.
    #[error("model {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("model {path}: field {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// Parses and validates one model's text.
pub fn parse(name: &str, path: &Path, text: &str) -> Result<Model, ModelsError> {
    let mut model: Model = toml::from_str(text).map_err(|e| ModelsError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim_end().replace('\n', " "),
    })?;
    model.name = name.to_owned();
    model.validate().map_err(|e| ModelsError::Invalid {
        path: path.to_owned(),
        field: e.field,
        message: e.message,
    })?;
    model.traffic = std::mem::take(&mut model.traffic).normalized();
    Ok(model)
}

/// Every model in `dir` (a missing folder holds none), plus the embedded default when the folder
/// has no `default.toml`. Sorted by name.
pub fn load(dir: &Path) -> Result<Vec<Model>, ModelsError> {
    let mut models = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry.map_err(|source| ModelsError::Dir {
                    path: dir.to_owned(),
                    source,
                })?;
                let path = entry.path();
                if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                    continue;
                }
                let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                    continue;
                };
                let text = std::fs::read_to_string(&path).map_err(|source| ModelsError::Read {
                    path: path.clone(),
                    source,
                })?;
                models.push(parse(name, &path, &text)?);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ModelsError::Dir {
                path: dir.to_owned(),
                source,
            });
        }
    }
    if !models.iter().any(|m| m.name == DEFAULT_MODEL) {
        models.push(parse(
            DEFAULT_MODEL,
            Path::new("(embedded) models/default.toml"),
            EMBEDDED_DEFAULT,
        )?);
    }
    models.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(models)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_models_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let models = load(&dir).expect("shipped models are valid");
        let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, vec!["default", "error-or-p99", "shadow", "staged"]);
        let staged = &models[3];
        let weights: Vec<f64> = staged.stages.iter().map(|s| s.weight).collect();
        assert_eq!(weights, vec![5.0, 20.0, 50.0, 100.0]);
    }

    #[test]
    fn every_shipped_model_reads_back_from_a_stored_analysis() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        for model in load(&dir).expect("shipped models are valid") {
            let record = canaryd_store::analysis::model_record(&model).expect("to record");
            let back = canaryd_store::analysis::model_of_record(&record).expect("from record");
            assert_eq!(back, model, "{}", model.name);
        }
    }

    #[test]
    fn a_missing_folder_still_has_the_default() {
        let models = load(Path::new("/nonexistent/canaryd-models")).expect("embedded default");
        assert_eq!(models.len(), 1);
        assert_eq!(models[0].name, DEFAULT_MODEL);
    }

    #[test]
    fn a_bad_model_names_the_file_and_field() {
        let dir = std::env::temp_dir().join(format!("canaryd-models-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("strict.toml");
        std::fs::write(&path, "[decision]\nhorizons_s = [10, 0]\n").expect("write");
        let e = load(&dir).expect_err("invalid").to_string();
        assert!(
            e.contains("strict.toml") && e.contains("decision.horizons_s[1]"),
            "{e}"
        );
        std::fs::write(&path, "[checks.latency]\nquantile = [0.5]\n").expect("write");
        let e = load(&dir).expect_err("unknown field").to_string();
        assert!(e.contains("strict.toml") && e.contains("quantile"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
