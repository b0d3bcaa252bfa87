//! The CLI's error: one line for the user, printed by `main` as `purehw: <message>`.

use std::fmt;

/// A user-facing failure. Every message names what failed (file, command, argument).
#[derive(Debug)]
pub struct CliError(pub String);

pub type CliResult<T = ()> = Result<T, CliError>;

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CliError {}

impl From<purehw_core::Error> for CliError {
    fn from(e: purehw_core::Error) -> Self {
        CliError(e.to_string())
    }
}

/// `bail!("...")`-style constructor.
pub fn err<T>(msg: impl Into<String>) -> CliResult<T> {
    Err(CliError(msg.into()))
}

/// Adds what was being done to an error, like anyhow's `context`.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> CliResult<T>;
}

impl<T, E: fmt::Display> Context<T> for Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> CliResult<T> {
        self.map_err(|e| CliError(format!("{}: {e}", what())))
    }
}
