//! Placeholder: the cleanup operation lands in its own issue.
