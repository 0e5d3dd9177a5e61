//! Data movers: short-lived helper Pods that move image bytes, with no API credentials. They
//! report through their container's termination message, which the controller reads from the
//! Pod's status.
//!
//! - [`copy`]: `vmkeep copy`, the host-assisted `copy` clone strategy (a clone PVC filled from
//!   its source by a copier Pod, for storage that cannot clone, into another StorageClass, and
//!   to save a VM disk as an image).
//! - [`import`]: `vmkeep import`, an Image's `source.http` (raw or qcow2, gzip or xz) streamed
//!   into its PVC by an importer Pod, or only sized (`--probe`).

pub mod copy;
pub mod import;
