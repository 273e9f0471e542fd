//! Placeholder: the maintenance operation lands in its own issue.
