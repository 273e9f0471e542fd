//! The operations: plain async functions of (database, parameters, cancellation) → report.
//!
//! Architecture invariant: operations know SQL and the fence, never queues or Redis. The
//! worker and the CLI's local mode call them the same way.
