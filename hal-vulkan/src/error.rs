//! The backend's errors: rich for people, coarse (`kind`) for code. Native result codes are
//! mapped in one place ([`VkError::api`]).

use ash::vk;
use purehw_hal::ErrorKind;
use purehw_hal::check::CheckError;

/// What a raw Vulkan call or the setup around it can fail with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum VkError {
    #[error("no Vulkan loader ({0})")]
    NoLoader(String),
    #[error("no usable Vulkan device: {0}")]
    NoDevice(String),
    #[error(
        "the Vulkan validation layer VK_LAYER_KHRONOS_validation is not installed (PUREHW_VK_VALIDATION=1 needs it)"
    )]
    NoValidationLayer,
    #[error("no suitable memory type")]
    NoMemoryType,
    #[error("host memory cannot be imported")]
    NoImport,
    #[error("buffer is not host-mapped")]
    NotMapped,
    #[error("the device ran out of memory allocating {bytes} bytes")]
    OutOfMemory { bytes: u64 },
    #[error("the device was lost")]
    DeviceLost,
    #[error("Vulkan call failed: {0}")]
    Api(vk::Result),
}

impl VkError {
    /// A failed call's result code.
    pub fn api(r: vk::Result) -> VkError {
        match r {
            vk::Result::ERROR_DEVICE_LOST => VkError::DeviceLost,
            vk::Result::ERROR_OUT_OF_DEVICE_MEMORY | vk::Result::ERROR_OUT_OF_HOST_MEMORY => {
                VkError::OutOfMemory { bytes: 0 }
            }
            vk::Result::ERROR_INCOMPATIBLE_DRIVER => VkError::NoDevice("no Vulkan driver found (no ICD)".into()),
            vk::Result::ERROR_INITIALIZATION_FAILED => {
                VkError::NoDevice("the Vulkan driver failed to initialise".into())
            }
            r => VkError::Api(r),
        }
    }

    /// A failed allocation of `bytes`.
    pub fn alloc(r: vk::Result, bytes: u64) -> VkError {
        match VkError::api(r) {
            VkError::OutOfMemory { .. } => VkError::OutOfMemory { bytes },
            e => e,
        }
    }
}

/// Everything the Vulkan backend can fail with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum VulkanError {
    /// Setting up or driving the device failed.
    #[error("{device}: {source}")]
    Vk {
        device: String,
        #[source]
        source: VkError,
    },
    /// Device memory ran out: what did not fit, against the device's memory.
    #[error(
        "{device}: out of device memory: {what} needs {need} bytes; {used} bytes already in use of {budget} bytes of device memory"
    )]
    OutOfMemory { device: String, what: String, need: u64, used: u64, budget: u64 },
    /// The device was lost (reset, removed, hung); its state is gone.
    #[error("{device}: the device was lost")]
    DeviceLost { device: String },
    /// The op breaks hal's contract.
    #[error(transparent)]
    Contract(#[from] CheckError),
    /// An op or format this backend does not run.
    #[error("{0}")]
    Unsupported(String),
    /// A weight whose bytes disagree with its shape.
    #[error("weight {rows}x{cols} {format} does not match its {bytes} bytes")]
    BadWeight { format: &'static str, rows: usize, cols: usize, bytes: usize },
}

impl purehw_hal::Error for VulkanError {
    fn kind(&self) -> ErrorKind {
        match self {
            VulkanError::OutOfMemory { .. } => ErrorKind::OutOfMemory,
            VulkanError::DeviceLost { .. } => ErrorKind::DeviceLost,
            VulkanError::Vk { source: VkError::DeviceLost, .. } => ErrorKind::DeviceLost,
            VulkanError::Vk { source: VkError::OutOfMemory { .. }, .. } => ErrorKind::OutOfMemory,
            VulkanError::Unsupported(_) => ErrorKind::Unsupported,
            _ => ErrorKind::Other,
        }
    }
}
