//! Placeholder: the analytics operation lands in its own issue.
