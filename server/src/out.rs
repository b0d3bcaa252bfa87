//! Writing to stdout without panicking: `println!` panics when the reader has gone away
//! (`purehw run ... | head`); here that becomes [`Closed`], which callers treat as "stop quietly".

use std::io::{self, Write};

use crate::error::{CliError, CliResult};

/// The reader closed stdout.
pub struct Closed;

/// Write `s` to stdout and flush (so streamed tokens show up at once).
pub fn print(s: &str) -> CliResult<Result<(), Closed>> {
    let mut out = io::stdout().lock();
    match out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(Ok(())),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(Err(Closed)),
        Err(e) => Err(CliError(format!("writing to stdout: {e}"))),
    }
}

/// [`print`] for output that is printed whole: a closed reader is not an error.
pub fn print_all(s: &str) -> CliResult {
    print(s).map(|_| ())
}
