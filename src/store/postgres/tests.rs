//! Tests of the PostgreSQL backend itself: what the store suite (`store/tests.rs`) cannot see from the
//! public API, like the schema, the plans, pipelining order and reconnecting.
