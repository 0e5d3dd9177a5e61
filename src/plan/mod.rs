//! The decisions, as plain functions of plain data: no client, no clock, no randomness. The
//! controllers observe, call these, and apply what they return.

pub mod build;
pub mod cached;
pub mod claim;
pub mod clone;
pub mod conditions;
pub mod image;
pub mod mover;
pub mod names;
pub mod quantity;
pub mod reason;
pub mod runtime;
pub mod template;
pub mod virtual_machine;

#[cfg(test)]
mod tests;
