//! Every reason vmkeep gives, in one place: the `reason` of conditions and Events, read by
//! users, `kubectl wait`, GitOps health checks and the tests. The plan decides them, the
//! controllers publish them, the admission webhook uses the same words.

// VirtualMachine: waiting (phase Pending) or never working (phase Failed).
/// The VM's Template does not exist (yet).
pub const TEMPLATE_NOT_FOUND: &str = "TemplateNotFound";
/// An Image the Template names does not exist (yet).
pub const IMAGE_NOT_FOUND: &str = "ImageNotFound";
/// An Image is importing, cloning, being deleted or changing its persistence.
pub const IMAGE_NOT_READY: &str = "ImageNotReady";
/// An Image is disabled: no new VM may start using it.
pub const IMAGE_DISABLED: &str = "ImageDisabled";
/// A Template disk size below its image's capacity, or above a persistent image's.
pub const INVALID_DISK_SIZE: &str = "InvalidDiskSize";
/// A Template that can never work (two CDROMs, a persistent image on two disks, ...).
pub const INVALID_TEMPLATE: &str = "InvalidTemplate";
/// A child's name is taken by an object that is not vmkeep's (VMs and Images).
pub const NAME_CONFLICT: &str = "NameConflict";
/// An Image's `source.pvc` names a disk vmkeep made (another Image's PVC or a VM's disk):
/// adopting it would bypass that disk's claim.
pub const PVC_MANAGED_BY_VMKEEP: &str = "PvcManagedByVmkeep";

/// The runtime asked for (`kubevirt`, or `auto` with KubeVirt's API served) cannot be used:
/// the cluster serves no KubeVirt VirtualMachineInstance API, or vmkeep may not watch it.
pub const RUNTIME_NOT_AVAILABLE: &str = "RuntimeNotAvailable";

// VirtualMachine: claims.
/// Another VM holds a persistent image (`onImageConflict: Reject`).
pub const IMAGE_IN_USE: &str = "ImageInUse";
/// Waiting for a persistent image (`onImageConflict: Wait`, or behind a VM created earlier).
pub const WAITING_FOR_IMAGE: &str = "WaitingForImage";
/// Every persistent image is held by this VM.
pub const CLAIMED: &str = "Claimed";
/// The VM has no persistent image to claim.
pub const NO_PERSISTENT_IMAGES: &str = "NoPersistentImages";
/// Every disk's PVC exists.
pub const DISKS_CREATED: &str = "DisksCreated";

// VirtualMachine: Ready.
/// The launcher Pod runs.
pub const RUNNING: &str = "Running";
/// The launcher Pod exists and does not run yet.
pub const STARTING: &str = "Starting";
/// A `copy` clone of the VM is being filled by its copier Pod; the launcher waits.
pub const COPYING: &str = "Copying";
/// Event: the accelerator QEMU runs the guest with (KVM, or TCG and why not KVM).
pub const ACCELERATOR: &str = "Accelerator";
/// The launcher Pod is being created.
pub const PROVISIONING: &str = "Provisioning";
/// `runStrategy: Halted` and no launcher Pod.
pub const HALTED: &str = "Halted";
/// `runStrategy: Halted` and the launcher Pod is going.
pub const STOPPING: &str = "Stopping";
/// Deleted: the launcher Pod goes, then the claims are released.
pub const TERMINATING: &str = "Terminating";

// Image.
/// `spec.source` names not exactly one kind.
pub const INVALID_SOURCE: &str = "InvalidSource";
/// A blank image without `spec.size`.
pub const MISSING_SIZE: &str = "MissingSize";
/// A `spec.size` that is not a positive size, or below the size of the image's PVC.
pub const INVALID_SIZE: &str = "InvalidSize";
/// The source Image of a clone does not exist (yet).
pub const SOURCE_NOT_FOUND: &str = "SourceNotFound";
/// The source Image of a clone is held by a VM.
pub const SOURCE_IN_USE: &str = "SourceInUse";
/// The source Image of a clone is not ready.
pub const SOURCE_NOT_READY: &str = "SourceNotReady";
/// Importing `source.http` (its importer Pod runs).
pub const IMPORTING: &str = "Importing";
/// Finding the size of an import without `spec.size` (its size probe Pod runs).
pub const SIZING: &str = "Sizing";
/// Terminal: the downloaded file's sha256 is not `source.http.sha256`.
pub const CHECKSUM_MISMATCH: &str = "ChecksumMismatch";
/// Terminal: the server answered a client error (4xx), or the import failed for good.
pub const IMPORT_FAILED: &str = "ImportFailed";
/// Terminal: the file is not in the format `source.http.format` says (or none vmkeep reads).
pub const UNSUPPORTED_FORMAT: &str = "UnsupportedFormat";
/// Terminal: the image is larger than `spec.size`.
pub const TOO_SMALL: &str = "TooSmall";
/// Terminal: a copier Pod failed.
pub const COPY_FAILED: &str = "CopyFailed";
/// A VM's launcher waits: an Image is being copied from one of its disks.
pub const DISK_BEING_COPIED: &str = "DiskBeingCopied";
/// A volume mode that differs from the source's or the PVC's.
pub const INVALID_VOLUME_MODE: &str = "InvalidVolumeMode";
/// An adopted PVC does not exist.
pub const PVC_NOT_FOUND: &str = "PvcNotFound";
/// The image's PVC lost its volume.
pub const PVC_LOST: &str = "PvcLost";
/// An adopted PVC is smaller than `spec.size`.
pub const PVC_TOO_SMALL: &str = "PvcTooSmall";
/// A non-persistent image's PVC is not bound: its capacity, which sizes clones, is unknown.
pub const PVC_NOT_BOUND: &str = "PvcNotBound";
/// `spec.size` grew: storage was asked to expand the image's PVC, or it is expanded once bound.
pub const EXPANDING: &str = "Expanding";
/// `spec.size` grew, storage expanded the volume, and its filesystem grows when a Pod next
/// mounts it (the PVC's `FileSystemResizePending`).
pub const FILESYSTEM_RESIZE_PENDING: &str = "FileSystemResizePending";
/// `spec.size` grew and the StorageClass does not allow volume expansion.
pub const EXPANSION_NOT_SUPPORTED: &str = "ExpansionNotSupported";
/// The image's PVC exists.
pub const PVC_READY: &str = "PvcReady";
/// The image's PVC is being cloned.
pub const CLONING: &str = "Cloning";
/// A VM uses the image (condition InUse); also why a persistence change waits.
pub const IN_USE: &str = "InUse";
/// No VM uses the image.
pub const UNUSED: &str = "Unused";
/// A deleted image whose users are gone: its PVC goes.
pub const DELETING: &str = "Deleting";
/// `spec.persistent` is in force.
pub const APPLIED: &str = "Applied";

// Template.
/// Every image of the Template exists and is usable.
pub const IMAGES_READY: &str = "ImagesReady";

// Any kind.
/// `Reconciling` and `Stalled` are False: the object is what its spec asks for.
pub const CONVERGED: &str = "Converged";
/// The object cannot be read as its kind (Warning Event, operator log and metrics): the
/// controllers skip it instead of stalling their watch.
pub const MALFORMED: &str = "Malformed";
