//! The one error type of the formats crate. Every variant names the file and, where there is one,
//! the tensor or field, plus what was expected and what was found, so a user can act on it.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;

/// Everything that can go wrong while reading, checking or writing a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// An operating-system error on a file or directory.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is missing, malformed or not a GPT-OSS config.
    #[error("{path}: {problem}")]
    Config { path: PathBuf, problem: String },
    /// A safetensors file or the index is malformed (header, offsets, dtype, truncation).
    #[error("{path}: {problem}")]
    File { path: PathBuf, problem: String },
    /// A tensor is present but wrong: shape, dtype, length or quantization metadata.
    #[error("tensor `{tensor}` in {path}: {problem}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        problem: String,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor `{tensor}` is missing from the checkpoint in {dir}{hint}")]
    MissingTensor {
        dir: PathBuf,
        tensor: String,
        hint: String,
    },
    /// The model directory or model id could not be resolved.
    #[error("{0}")]
    NotFound(String),
    /// Bad arguments to a writer, converter or synthesizer.
    #[error("{0}")]
    Invalid(String),
}

impl FormatError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FormatError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn tensor(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        problem: impl Into<String>,
    ) -> Self {
        FormatError::Tensor {
            path: path.into(),
            tensor: tensor.into(),
            problem: problem.into(),
        }
    }

    pub(crate) fn file(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        FormatError::File {
            path: path.into(),
            problem: problem.into(),
        }
    }
}
