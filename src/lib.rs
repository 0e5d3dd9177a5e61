//! vmkeep: VM disk images on Kubernetes with OpenNebula's persistence model.
//!
//! - [`api`]: the custom resource types (`Image`, `Template`, `VirtualMachine`).
//! - [`operator`]: `vmkeep run`: connect, wait for the CRDs, serve health and metrics, run the
//!   controllers, stop cleanly on SIGTERM.
//! - [`controller`]: the reconcilers and what they share.
//! - [`kubevirt`]: the KubeVirt runtime's IO (is its API served, vmkeep's VirtualMachineInstances).
//! - [`webhook`]: the optional validating admission webhook and its certificates.
//! - [`health`], [`metrics`], [`telemetry`]: the operator's HTTP endpoints, Prometheus
//!   metrics and logging.

pub mod api;
pub mod claim;
pub mod controller;
pub mod health;
pub mod kubevirt;
pub mod launcher;
pub mod leader;
pub mod metrics;
pub mod mover;
pub mod operator;
pub mod plan;
pub mod telemetry;
pub mod webhook;
pub mod write;
