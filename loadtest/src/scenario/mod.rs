//! One module per scenario. Each defines its command-line options (a clap `Args` struct) and a `run`
//! that prints a human summary and, last, one JSON line for scripts.
//!
//! Now: [`idle`], [`ingest`]. Planned: history, fanout, targeted, chat.

pub mod idle;
pub mod ingest;
