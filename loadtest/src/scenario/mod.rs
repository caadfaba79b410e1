//! One module per scenario. Each defines its command-line options (a clap `Args` struct) and a `run`
//! that prints a human summary and, last, one JSON line for scripts.
//!
//! [`idle`], [`ingest`], [`history`], [`crossnode`]; and the delivery scenarios [`fanout`], [`targeted`],
//! [`chat`], which share receivers, publishers and measurements through [`delivery`]. [`receivers`]
//! opens the WebSocket connections of `idle` and the delivery scenarios.

pub mod chat;
pub mod crossnode;
pub mod delivery;
pub mod fanout;
pub mod history;
pub mod idle;
pub mod ingest;
pub mod receivers;
pub mod targeted;
