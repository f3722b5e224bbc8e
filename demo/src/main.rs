//! The lab demo (being written).
fn main() {}
