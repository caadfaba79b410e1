//! One module per scenario. Each defines its command-line options (a clap `Args` struct) and a `run`
//! that prints a human summary and, last, one JSON line for scripts.
//!
//! Now: [`idle`], [`ingest`], [`history`], [`crossnode`]. Planned: fanout, targeted, chat.

pub mod crossnode;
pub mod history;
pub mod idle;
pub mod ingest;
