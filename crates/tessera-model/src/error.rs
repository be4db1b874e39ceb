//! Configuration errors: each names the file, position, field path and reason.

use std::fmt;

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{col}: {path}: {reason}")]
pub struct ConfigError {
    /// The file the problem is in.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
    /// Dotted field path, e.g. `clusters[0].connect_timeout`.
    pub path: String,
    /// What is wrong, and where it helps, what to write instead.
    pub reason: String,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Io {
        /// The file.
        file: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but holds errors; every one found is listed.
    #[error("{}", ErrorList(.0))]
    Invalid(Vec<ConfigError>),
}

impl LoadError {
    /// The individual errors (empty for I/O failures).
    pub fn errors(&self) -> &[ConfigError] {
        match self {
            LoadError::Io { .. } => &[],
            LoadError::Invalid(e) => e,
        }
    }
}

struct ErrorList<'a>(&'a [ConfigError]);

impl fmt::Display for ErrorList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "{n} error{} in configuration", if n == 1 { "" } else { "s" })?;
        for e in self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}
