//! Every ash call, each wrapped once in a small safe function. This is the crate's only module
//! with `unsafe`; each block says why it holds. The invariants the blocks lean on:
//! * every handle passed in was created by this [`Gpu`] and is destroyed only through it
//!   (buffers by [`Gpu::destroy_buffer`], the rest when the `Gpu` drops), after the device is idle;
//! * command buffers are recorded by one thread at a time (`&mut` receivers) and are not
//!   re-recorded while a submission using them is pending (the backend waits on its fence first).
#![allow(unsafe_code)]

use std::ffi::{CStr, c_void};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use ash::vk;

use crate::error::VkError;

type Result<T> = std::result::Result<T, VkError>;

/// The validation layer the tests demand (`PUREHW_VK_VALIDATION=1`).
pub const VALIDATION_LAYER: &CStr = c"VK_LAYER_KHRONOS_validation";

/// Messages the validation layer reported (errors and warnings), for tests to assert on.
pub static VALIDATION_MESSAGES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The debug messenger's callback: keep errors and warnings.
unsafe extern "system" fn on_message(
    severity: vk::DebugUtilsMessageSeverityFlagsEXT,
    _types: vk::DebugUtilsMessageTypeFlagsEXT,
    data: *const vk::DebugUtilsMessengerCallbackDataEXT<'_>,
    _user: *mut c_void,
) -> vk::Bool32 {
    let warn = vk::DebugUtilsMessageSeverityFlagsEXT::WARNING | vk::DebugUtilsMessageSeverityFlagsEXT::ERROR;
    if severity.intersects(warn) {
        // SAFETY: the loader passes a valid callback-data struct whose message, when non-null, is
        // a NUL-terminated string, both alive for the duration of the call.
        let msg = unsafe { data.as_ref().and_then(|d| d.message_as_c_str()) }
            .map(|m| m.to_string_lossy().into_owned())
            .unwrap_or_default();
        log::warn!("vulkan validation: {msg}");
        if let Ok(mut v) = VALIDATION_MESSAGES.lock() {
            v.push(msg);
        }
    }
    vk::FALSE
}

/// The Vulkan library, opened at run time, once per process and never closed: drivers (NVIDIA's
/// among them) do not survive being unloaded and loaded again.
pub fn load_entry() -> Result<ash::Entry> {
    static ENTRY: std::sync::OnceLock<std::result::Result<ash::Entry, String>> = std::sync::OnceLock::new();
    ENTRY
        .get_or_init(|| {
            // SAFETY: loading libvulkan runs its initialisers; the library is the system's Vulkan
            // loader, and this static keeps it loaded for the rest of the process.
            unsafe { ash::Entry::load() }.map_err(|e| e.to_string())
        })
        .clone()
        .map_err(VkError::NoLoader)
}

/// What one physical device offers that matters to us.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub index: usize,
    pub name: String,
    pub kind: vk::PhysicalDeviceType,
    pub api_version: u32,
    pub driver: String,
    pub subgroup_size: u32,
    /// Subgroup shuffles in compute shaders (the matmuls gather lanes with them).
    pub subgroup_shuffle: bool,
    pub float16: bool,
    /// f64 arithmetic in shaders (`shaderFloat64`): the exact division and square root settle
    /// their rounding with it (see `exact.glsl`).
    pub float64: bool,
    pub int8_dot: bool,
    pub coopmat: bool,
    pub coopmat2: bool,
    pub external_memory_host: bool,
    pub buffer_device_address: bool,
    /// f32 denormals kept in shaders (every shader asks for it: the reference keeps them).
    pub denorm_preserve: bool,
    pub heaps: Vec<(u64, bool)>, // (size, device-local)
    pub max_alloc: u64,
    pub max_shared: u32,
    pub timestamp_period: f32,
    pub timestamps: bool,
    pub min_import_align: u64,
    pub uuid: [u8; 16],
}

impl DeviceInfo {
    /// Whether the device shares memory with the host (integrated GPUs, CPU devices).
    pub fn unified(&self) -> bool {
        matches!(self.kind, vk::PhysicalDeviceType::INTEGRATED_GPU | vk::PhysicalDeviceType::CPU)
    }
}

fn has_ext(exts: &[vk::ExtensionProperties], name: &CStr) -> bool {
    exts.iter().any(|e| e.extension_name_as_c_str().is_ok_and(|n| n == name))
}

/// An instance, maybe with the validation layer and its messenger.
pub struct Instance {
    pub instance: ash::Instance,
    debug: Option<(ash::ext::debug_utils::Instance, vk::DebugUtilsMessengerEXT)>,
}

impl Instance {
    /// The process's instance with or without the validation layer, made on first use and
    /// never destroyed: the loader unloads the driver when its last instance goes, and NVIDIA's
    /// does not load again after a few dozen such cycles ("no Vulkan driver found"), which a
    /// server recreating a lost device or a test suite making many backends would hit.
    pub fn shared(validation: bool) -> Result<Arc<Instance>> {
        static PLAIN: Mutex<Option<Arc<Instance>>> = Mutex::new(None);
        static VALIDATED: Mutex<Option<Arc<Instance>>> = Mutex::new(None);
        let slot = if validation { &VALIDATED } else { &PLAIN };
        let mut g = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = &*g {
            return Ok(i.clone());
        }
        let i = Arc::new(Instance::new(validation)?);
        *g = Some(i.clone());
        Ok(i)
    }

    fn new(validation: bool) -> Result<Instance> {
        let entry = load_entry()?;
        // SAFETY: a plain query on a loaded entry.
        let version =
            unsafe { entry.try_enumerate_instance_version() }.map_err(VkError::api)?.unwrap_or(vk::API_VERSION_1_0);
        if version < vk::API_VERSION_1_2 {
            return Err(VkError::NoDevice(format!(
                "the Vulkan loader offers {}.{}, need 1.2",
                vk::api_version_major(version),
                vk::api_version_minor(version)
            )));
        }
        let app = vk::ApplicationInfo::default()
            .application_name(c"purehw")
            .engine_name(c"purehw")
            .api_version(version.min(vk::API_VERSION_1_3));
        let mut layers: Vec<*const i8> = Vec::new();
        let mut exts: Vec<*const i8> = Vec::new();
        if validation {
            // SAFETY: a plain query on a loaded entry.
            let have = unsafe { entry.enumerate_instance_layer_properties() }.map_err(VkError::api)?;
            if !have.iter().any(|l| l.layer_name_as_c_str().is_ok_and(|n| n == VALIDATION_LAYER)) {
                return Err(VkError::NoValidationLayer);
            }
            layers.push(VALIDATION_LAYER.as_ptr());
            exts.push(ash::ext::debug_utils::NAME.as_ptr());
        }
        // Mesa's lavapipe is listed only with portability enumeration on some loaders; harmless elsewhere.
        // SAFETY: a plain query on a loaded entry.
        let inst_exts = unsafe { entry.enumerate_instance_extension_properties(None) }.map_err(VkError::api)?;
        let mut flags = vk::InstanceCreateFlags::empty();
        if has_ext(&inst_exts, ash::khr::portability_enumeration::NAME) {
            exts.push(ash::khr::portability_enumeration::NAME.as_ptr());
            flags |= vk::InstanceCreateFlags::ENUMERATE_PORTABILITY_KHR;
        }
        let info = vk::InstanceCreateInfo::default()
            .application_info(&app)
            .enabled_layer_names(&layers)
            .enabled_extension_names(&exts)
            .flags(flags);
        // SAFETY: the create info and every string it points to live until the call returns.
        let instance = unsafe { entry.create_instance(&info, None) }.map_err(VkError::api)?;
        let debug = if validation {
            let du = ash::ext::debug_utils::Instance::new(&entry, &instance);
            let sev = vk::DebugUtilsMessageSeverityFlagsEXT::WARNING | vk::DebugUtilsMessageSeverityFlagsEXT::ERROR;
            let ty = vk::DebugUtilsMessageTypeFlagsEXT::GENERAL
                | vk::DebugUtilsMessageTypeFlagsEXT::VALIDATION
                | vk::DebugUtilsMessageTypeFlagsEXT::PERFORMANCE;
            let mi = vk::DebugUtilsMessengerCreateInfoEXT::default()
                .message_severity(sev)
                .message_type(ty)
                .pfn_user_callback(Some(on_message));
            // SAFETY: the instance was created with the debug-utils extension; the callback is a
            // plain function that outlives the messenger.
            let m = unsafe { du.create_debug_utils_messenger(&mi, None) }.map_err(VkError::api)?;
            Some((du, m))
        } else {
            None
        };
        Ok(Instance { instance, debug })
    }

    /// Every physical device, described.
    pub fn devices(&self) -> Result<Vec<(vk::PhysicalDevice, DeviceInfo)>> {
        // SAFETY: a plain query on a live instance.
        let pdevs = unsafe { self.instance.enumerate_physical_devices() }.map_err(VkError::api)?;
        let mut out = Vec::new();
        for (index, pd) in pdevs.into_iter().enumerate() {
            out.push((pd, self.describe(index, pd)?));
        }
        Ok(out)
    }

    fn describe(&self, index: usize, pd: vk::PhysicalDevice) -> Result<DeviceInfo> {
        let i = &self.instance;
        // SAFETY: `pd` came from this instance; the queries write only into the structs passed.
        let exts = unsafe { i.enumerate_device_extension_properties(pd) }.map_err(VkError::api)?;
        let mut sub = vk::PhysicalDeviceSubgroupProperties::default();
        let mut drv = vk::PhysicalDeviceDriverProperties::default();
        let mut host = vk::PhysicalDeviceExternalMemoryHostPropertiesEXT::default();
        let mut p12 = vk::PhysicalDeviceVulkan12Properties::default();
        let ext_host = has_ext(&exts, ash::ext::external_memory_host::NAME);
        let mut props2 =
            vk::PhysicalDeviceProperties2::default().push_next(&mut sub).push_next(&mut drv).push_next(&mut p12);
        if ext_host {
            props2 = props2.push_next(&mut host);
        }
        // SAFETY: as above; the chained structs outlive the call.
        unsafe { i.get_physical_device_properties2(pd, &mut props2) };
        let p = props2.properties;
        let mut f12 = vk::PhysicalDeviceVulkan12Features::default();
        let mut f13 = vk::PhysicalDeviceVulkan13Features::default();
        let mut feats = vk::PhysicalDeviceFeatures2::default().push_next(&mut f12);
        let v13 = p.api_version >= vk::API_VERSION_1_3;
        if v13 {
            feats = feats.push_next(&mut f13);
        }
        // SAFETY: as above.
        unsafe { i.get_physical_device_features2(pd, &mut feats) };
        let float64 = feats.features.shader_float64 != 0;
        // SAFETY: as above.
        let mem = unsafe { i.get_physical_device_memory_properties(pd) };
        let heaps = mem.memory_heaps[..mem.memory_heap_count as usize]
            .iter()
            .map(|h| (h.size, h.flags.contains(vk::MemoryHeapFlags::DEVICE_LOCAL)))
            .collect();
        // SAFETY: as above.
        let qf = unsafe { i.get_physical_device_queue_family_properties(pd) };
        let timestamps =
            qf.iter().any(|q| q.queue_flags.contains(vk::QueueFlags::COMPUTE) && q.timestamp_valid_bits > 0);
        let driver = format!(
            "{} {}",
            drv.driver_name_as_c_str().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            drv.driver_info_as_c_str().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
        );
        Ok(DeviceInfo {
            index,
            name: p.device_name_as_c_str().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            kind: p.device_type,
            api_version: p.api_version,
            driver: driver.trim().to_string(),
            subgroup_size: sub.subgroup_size,
            subgroup_shuffle: sub.supported_operations.contains(vk::SubgroupFeatureFlags::SHUFFLE)
                && sub.supported_stages.contains(vk::ShaderStageFlags::COMPUTE),
            float16: f12.shader_float16 != 0,
            float64,
            int8_dot: v13 && f13.shader_integer_dot_product != 0,
            coopmat: has_ext(&exts, c"VK_KHR_cooperative_matrix"),
            coopmat2: has_ext(&exts, c"VK_NV_cooperative_matrix2"),
            external_memory_host: ext_host,
            buffer_device_address: f12.buffer_device_address != 0,
            denorm_preserve: p12.shader_denorm_preserve_float32 != 0,
            heaps,
            max_alloc: {
                let mut m3 = vk::PhysicalDeviceMaintenance3Properties::default();
                let mut pp = vk::PhysicalDeviceProperties2::default().push_next(&mut m3);
                // SAFETY: as above.
                unsafe { i.get_physical_device_properties2(pd, &mut pp) };
                m3.max_memory_allocation_size
            },
            max_shared: p.limits.max_compute_shared_memory_size,
            timestamp_period: p.limits.timestamp_period,
            timestamps,
            min_import_align: host.min_imported_host_pointer_alignment,
            uuid: p.pipeline_cache_uuid,
        })
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: every device made from this instance is gone (a `Gpu` owns its `Instance` and
        // drops its device first); the messenger was made from this instance.
        unsafe {
            if let Some((du, m)) = self.debug.take() {
                du.destroy_debug_utils_messenger(m, None);
            }
            self.instance.destroy_instance(None);
        }
    }
}

/// Where a buffer's memory lives.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Mem {
    /// Fast for the device; mapped too when the device shares memory with the host.
    Device,
    /// Host-visible and coherent: written by the host, read by the device (staging, step data).
    Upload,
    /// Host-visible, preferably cached: written by the device, read by the host.
    Readback,
}

/// A buffer with its own memory.
#[derive(Debug)]
pub struct RawBuffer {
    pub buffer: vk::Buffer,
    memory: vk::DeviceMemory,
    pub size: u64,
    pub addr: u64,
    /// Host pointer when the memory is mapped.
    mapped: Option<NonNull<u8>>,
}

// SAFETY: the mapped pointer is only dereferenced through `Gpu::{write,read}_mapped`, which take
// `&self`/`&mut`-disciplined access from the one thread that owns the backend at a time.
unsafe impl Send for RawBuffer {}

impl RawBuffer {
    pub fn is_mapped(&self) -> bool {
        self.mapped.is_some()
    }
}

/// A compute pipeline and its layout (shared push-constant range, no descriptor sets).
#[derive(Copy, Clone, Debug)]
pub struct Pipeline {
    pub pipeline: vk::Pipeline,
}

/// The logical device, its one compute queue, and everything made from them.
pub struct Gpu {
    pub info: DeviceInfo,
    device: ash::Device,
    host_ext: Option<ash::ext::external_memory_host::Device>,
    queue: vk::Queue,
    mem: vk::PhysicalDeviceMemoryProperties,
    layout: vk::PipelineLayout,
    pool: vk::CommandPool,
    pipelines: Vec<vk::Pipeline>,
    modules: Vec<vk::ShaderModule>,
    cache: vk::PipelineCache,
    query_pool: vk::QueryPool,
    // Dropped last (fields drop after `Drop::drop` destroyed the device): the instance outlives it.
    _instance: Arc<Instance>,
}

/// Push constants every kernel may use.
pub const PUSH_BYTES: u32 = 128;
/// Timestamp queries per step: the step's start and end, then one per dispatch when profiling.
pub const QUERIES: u32 = 4096;

impl Gpu {
    /// Open device `pd` of `instance`.
    pub fn new(instance: Arc<Instance>, pd: vk::PhysicalDevice, info: DeviceInfo, cache_data: &[u8]) -> Result<Gpu> {
        let i = &instance.instance;
        if !info.buffer_device_address {
            return Err(VkError::NoDevice(format!("{}: no buffer device address support", info.name)));
        }

        // SAFETY: `pd` came from this instance.
        let qf = unsafe { i.get_physical_device_queue_family_properties(pd) };
        // Prefer a compute-only family (no graphics work shares it), else any with compute.
        let fam = qf
            .iter()
            .position(|q| {
                q.queue_flags.contains(vk::QueueFlags::COMPUTE) && !q.queue_flags.contains(vk::QueueFlags::GRAPHICS)
            })
            .or_else(|| qf.iter().position(|q| q.queue_flags.contains(vk::QueueFlags::COMPUTE)))
            .ok_or_else(|| VkError::NoDevice(format!("{}: no compute queue", info.name)))? as u32;
        let prio = [1.0f32];
        let qi = [vk::DeviceQueueCreateInfo::default().queue_family_index(fam).queue_priorities(&prio)];
        let mut exts: Vec<*const i8> = Vec::new();
        if info.external_memory_host {
            exts.push(ash::ext::external_memory_host::NAME.as_ptr());
            exts.push(ash::khr::external_memory::NAME.as_ptr());
        }
        if info.subgroup_size < 8 || !info.subgroup_shuffle {
            return Err(VkError::NoDevice(format!(
                "{}: compute subgroups of {} without shuffles (need at least 8 lanes with shuffles)",
                info.name, info.subgroup_size
            )));
        }
        let mut f12 = vk::PhysicalDeviceVulkan12Features::default().buffer_device_address(true);
        let mut f13 = vk::PhysicalDeviceVulkan13Features::default().shader_integer_dot_product(true);
        let base = vk::PhysicalDeviceFeatures::default().shader_float64(info.float64);
        let mut f2 = vk::PhysicalDeviceFeatures2::default().features(base).push_next(&mut f12);
        if info.int8_dot {
            f2 = f2.push_next(&mut f13);
        }
        let di =
            vk::DeviceCreateInfo::default().queue_create_infos(&qi).enabled_extension_names(&exts).push_next(&mut f2);
        // SAFETY: the create info and its chain live until the call returns; the features asked
        // for were reported by this device.
        let device = unsafe { i.create_device(pd, &di, None) }.map_err(VkError::api)?;
        // SAFETY: family `fam` with one queue was requested above.
        let queue = unsafe { device.get_device_queue(fam, 0) };
        let host_ext = info.external_memory_host.then(|| ash::ext::external_memory_host::Device::new(i, &device));
        // SAFETY: `pd` came from this instance.
        let mem = unsafe { i.get_physical_device_memory_properties(pd) };
        let range =
            [vk::PushConstantRange::default().stage_flags(vk::ShaderStageFlags::COMPUTE).offset(0).size(PUSH_BYTES)];
        let li = vk::PipelineLayoutCreateInfo::default().push_constant_ranges(&range);
        let pi = vk::CommandPoolCreateInfo::default()
            .queue_family_index(fam)
            .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER);
        let ci = vk::PipelineCacheCreateInfo::default().initial_data(cache_data);
        let qpi = vk::QueryPoolCreateInfo::default().query_type(vk::QueryType::TIMESTAMP).query_count(QUERIES);
        // SAFETY: plain object creation on a live device with valid create infos.
        let (layout, pool, cache, query_pool) = unsafe {
            let layout = device.create_pipeline_layout(&li, None).map_err(VkError::api)?;
            let pool = device.create_command_pool(&pi, None).map_err(VkError::api)?;
            // A cache blob from another driver is ignored by the driver; a failure here only costs
            // the warm start, so fall back to an empty cache.
            let cache = device
                .create_pipeline_cache(&ci, None)
                .or_else(|_| device.create_pipeline_cache(&vk::PipelineCacheCreateInfo::default(), None))
                .map_err(VkError::api)?;
            let qp = if info.timestamps {
                device.create_query_pool(&qpi, None).map_err(VkError::api)?
            } else {
                vk::QueryPool::null()
            };
            (layout, pool, cache, qp)
        };
        Ok(Gpu {
            info,
            device,
            host_ext,
            queue,
            mem,
            layout,
            pool,
            pipelines: Vec::new(),
            modules: Vec::new(),
            cache,
            query_pool,
            _instance: instance,
        })
    }

    fn memory_type(&self, bits: u32, want: vk::MemoryPropertyFlags, avoid: vk::MemoryPropertyFlags) -> Option<u32> {
        (0..self.mem.memory_type_count).find(|&t| {
            let f = self.mem.memory_types[t as usize].property_flags;
            bits & (1 << t) != 0 && f.contains(want) && !f.intersects(avoid)
        })
    }

    fn pick_memory(&self, bits: u32, kind: Mem) -> Option<(u32, bool)> {
        use vk::MemoryPropertyFlags as F;
        let hv = F::HOST_VISIBLE | F::HOST_COHERENT;
        let none = F::empty();
        let found = match kind {
            // Device-local; on a unified device prefer one the host can map too.
            Mem::Device => self
                .memory_type(bits, F::DEVICE_LOCAL | hv, none)
                .filter(|_| self.info.unified())
                .or_else(|| self.memory_type(bits, F::DEVICE_LOCAL, none))
                .or_else(|| self.memory_type(bits, none, none)),
            Mem::Upload => self.memory_type(bits, hv, F::DEVICE_LOCAL).or_else(|| self.memory_type(bits, hv, none)),
            Mem::Readback => {
                self.memory_type(bits, hv | F::HOST_CACHED, none).or_else(|| self.memory_type(bits, hv, none))
            }
        }?;
        let flags = self.mem.memory_types[found as usize].property_flags;
        Some((found, flags.contains(hv)))
    }

    /// A storage buffer of `size` bytes (its device address usable by shaders).
    pub fn create_buffer(&self, size: u64, kind: Mem) -> Result<RawBuffer> {
        let size = size.max(16);
        let usage = vk::BufferUsageFlags::STORAGE_BUFFER
            | vk::BufferUsageFlags::SHADER_DEVICE_ADDRESS
            | vk::BufferUsageFlags::TRANSFER_SRC
            | vk::BufferUsageFlags::TRANSFER_DST;
        let bi = vk::BufferCreateInfo::default().size(size).usage(usage).sharing_mode(vk::SharingMode::EXCLUSIVE);
        // SAFETY: valid create info on a live device.
        let buffer = unsafe { self.device.create_buffer(&bi, None) }.map_err(VkError::api)?;
        // SAFETY: `buffer` was just created on this device.
        let req = unsafe { self.device.get_buffer_memory_requirements(buffer) };
        let Some((ty, host_visible)) = self.pick_memory(req.memory_type_bits, kind) else {
            // SAFETY: the buffer is unused.
            unsafe { self.device.destroy_buffer(buffer, None) };
            return Err(VkError::NoMemoryType);
        };
        let mut flags = vk::MemoryAllocateFlagsInfo::default().flags(vk::MemoryAllocateFlags::DEVICE_ADDRESS);
        let ai =
            vk::MemoryAllocateInfo::default().allocation_size(req.size).memory_type_index(ty).push_next(&mut flags);
        // SAFETY: valid allocate info; on failure the buffer is destroyed before returning.
        let memory = match unsafe { self.device.allocate_memory(&ai, None) } {
            Ok(m) => m,
            Err(e) => {
                // SAFETY: the buffer is unused.
                unsafe { self.device.destroy_buffer(buffer, None) };
                return Err(VkError::alloc(e, size));
            }
        };
        self.finish_buffer(buffer, memory, size, host_visible)
    }

    /// Bind, take the address, map when host-visible.
    fn finish_buffer(&self, buffer: vk::Buffer, memory: vk::DeviceMemory, size: u64, map: bool) -> Result<RawBuffer> {
        // SAFETY: `memory` was allocated for `buffer`'s requirements (or imported to cover it) and
        // neither is bound or mapped yet.
        let r = unsafe {
            self.device.bind_buffer_memory(buffer, memory, 0).and_then(|_| {
                if map {
                    self.device
                        .map_memory(memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty())
                        .map(|p| NonNull::new(p.cast::<u8>()))
                } else {
                    Ok(None)
                }
            })
        };
        let mapped = match r {
            Ok(m) => m,
            Err(e) => {
                // SAFETY: both objects are unused.
                unsafe {
                    self.device.destroy_buffer(buffer, None);
                    self.device.free_memory(memory, None);
                }
                return Err(VkError::api(e));
            }
        };
        // SAFETY: the buffer has SHADER_DEVICE_ADDRESS usage and memory allocated with the
        // device-address flag (or imported with it), bound above.
        let addr =
            unsafe { self.device.get_buffer_device_address(&vk::BufferDeviceAddressInfo::default().buffer(buffer)) };
        Ok(RawBuffer { buffer, memory, size, addr, mapped })
    }

    /// A buffer over host memory `[ptr, ptr + len)` (VK_EXT_external_memory_host): the device reads
    /// the host's pages in place. `ptr` and `len` must be multiples of the device's import
    /// alignment, and the memory must stay mapped while the buffer lives (the caller holds it).
    pub fn import_host(&self, bytes: &[u8]) -> Result<RawBuffer> {
        let Some(ext) = &self.host_ext else { return Err(VkError::NoImport) };
        let align = self.info.min_import_align.max(1);
        let (ptr, len) = (bytes.as_ptr(), bytes.len() as u64);
        if !(ptr as u64).is_multiple_of(align) || !len.is_multiple_of(align) || len == 0 {
            return Err(VkError::NoImport);
        }
        let ht = vk::ExternalMemoryHandleTypeFlags::HOST_ALLOCATION_EXT;
        let mut props = vk::MemoryHostPointerPropertiesEXT::default();
        // SAFETY: `ptr` points to `len` readable bytes that outlive the import (caller's contract);
        // the function only queries which memory types can import it.
        let r = unsafe {
            (ext.fp().get_memory_host_pointer_properties_ext)(self.device.handle(), ht, ptr.cast(), &mut props)
        };
        if r != vk::Result::SUCCESS {
            return Err(VkError::NoImport);
        }
        let mut ext_info = vk::ExternalMemoryBufferCreateInfo::default().handle_types(ht);
        let usage = vk::BufferUsageFlags::STORAGE_BUFFER
            | vk::BufferUsageFlags::SHADER_DEVICE_ADDRESS
            | vk::BufferUsageFlags::TRANSFER_SRC;
        let bi = vk::BufferCreateInfo::default().size(len).usage(usage).push_next(&mut ext_info);
        // SAFETY: valid create info on a live device.
        let buffer = unsafe { self.device.create_buffer(&bi, None) }.map_err(VkError::api)?;
        // SAFETY: `buffer` was just created on this device.
        let req = unsafe { self.device.get_buffer_memory_requirements(buffer) };
        let bits = req.memory_type_bits & props.memory_type_bits;
        let Some(ty) = self.memory_type(bits, vk::MemoryPropertyFlags::empty(), vk::MemoryPropertyFlags::empty())
        else {
            // SAFETY: the buffer is unused.
            unsafe { self.device.destroy_buffer(buffer, None) };
            return Err(VkError::NoImport);
        };
        let mut import = vk::ImportMemoryHostPointerInfoEXT::default().handle_type(ht).host_pointer(ptr as *mut c_void);
        let mut flags = vk::MemoryAllocateFlagsInfo::default().flags(vk::MemoryAllocateFlags::DEVICE_ADDRESS);
        let ai = vk::MemoryAllocateInfo::default()
            .allocation_size(len)
            .memory_type_index(ty)
            .push_next(&mut import)
            .push_next(&mut flags);
        // SAFETY: the host range is aligned and stays valid while the buffer lives (see above).
        let memory = match unsafe { self.device.allocate_memory(&ai, None) } {
            Ok(m) => m,
            Err(_) => {
                // SAFETY: the buffer is unused.
                unsafe { self.device.destroy_buffer(buffer, None) };
                return Err(VkError::NoImport);
            }
        };
        self.finish_buffer(buffer, memory, len, false)
    }

    pub fn destroy_buffer(&self, b: RawBuffer) {
        // SAFETY: the caller waited for the device to finish every use of `b` and drops its last
        // copy of the handles here; mapped memory is unmapped by freeing it.
        unsafe {
            self.device.destroy_buffer(b.buffer, None);
            self.device.free_memory(b.memory, None);
        }
    }

    /// Copy `src` into a mapped buffer at byte `offset`.
    pub fn write_mapped(&self, b: &RawBuffer, offset: u64, src: &[u8]) -> Result<()> {
        let p = b.mapped.ok_or(VkError::NotMapped)?;
        if offset.checked_add(src.len() as u64).is_none_or(|e| e > b.size) {
            return Err(VkError::NotMapped);
        }
        // SAFETY: the mapping covers `b.size` bytes and the range was checked; the device does not
        // access this range concurrently (the backend waits before reusing staging memory).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), p.as_ptr().add(offset as usize), src.len()) };
        Ok(())
    }

    /// Copy from a mapped buffer at byte `offset` into `dst`.
    pub fn read_mapped(&self, b: &RawBuffer, offset: u64, dst: &mut [u8]) -> Result<()> {
        let p = b.mapped.ok_or(VkError::NotMapped)?;
        if offset.checked_add(dst.len() as u64).is_none_or(|e| e > b.size) {
            return Err(VkError::NotMapped);
        }
        // SAFETY: as in write_mapped; the device finished writing (fence waited) before this read.
        unsafe { std::ptr::copy_nonoverlapping(p.as_ptr().add(offset as usize), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// A compute pipeline from SPIR-V, with `spec` as specialization constants 0, 1, ….
    pub fn create_pipeline(&mut self, spirv: &[u32], spec: &[u32]) -> Result<Pipeline> {
        let stripped;
        let spirv = if self.info.denorm_preserve {
            spirv
        } else {
            stripped = without_denorm_preserve(spirv);
            &stripped[..]
        };
        let mi = vk::ShaderModuleCreateInfo::default().code(spirv);
        // SAFETY: `spirv` is a complete module produced by glslang at build time.
        let module = unsafe { self.device.create_shader_module(&mi, None) }.map_err(VkError::api)?;
        self.modules.push(module);
        let entries: Vec<vk::SpecializationMapEntry> = (0..spec.len() as u32)
            .map(|i| vk::SpecializationMapEntry::default().constant_id(i).offset(4 * i).size(4))
            .collect();
        let data: Vec<u8> = spec.iter().flat_map(|v| v.to_le_bytes()).collect();
        let si = vk::SpecializationInfo::default().map_entries(&entries).data(&data);
        let mut stage = vk::PipelineShaderStageCreateInfo::default()
            .stage(vk::ShaderStageFlags::COMPUTE)
            .module(module)
            .name(c"main");
        if !spec.is_empty() {
            stage = stage.specialization_info(&si);
        }
        let ci = [vk::ComputePipelineCreateInfo::default().stage(stage).layout(self.layout)];
        // SAFETY: valid create info; the module and layout are live.
        let p = unsafe { self.device.create_compute_pipelines(self.cache, &ci, None) }
            .map_err(|(_, e)| VkError::api(e))?[0];
        self.pipelines.push(p);
        Ok(Pipeline { pipeline: p })
    }

    /// The pipeline cache's contents, to keep on disk.
    pub fn pipeline_cache_data(&self) -> Vec<u8> {
        // SAFETY: a query on a live cache.
        unsafe { self.device.get_pipeline_cache_data(self.cache) }.unwrap_or_default()
    }

    pub fn command_buffer(&self) -> Result<vk::CommandBuffer> {
        let ai = vk::CommandBufferAllocateInfo::default()
            .command_pool(self.pool)
            .level(vk::CommandBufferLevel::PRIMARY)
            .command_buffer_count(1);
        // SAFETY: valid allocate info on a live pool.
        Ok(unsafe { self.device.allocate_command_buffers(&ai) }.map_err(VkError::api)?[0])
    }

    pub fn free_command_buffer(&self, cb: vk::CommandBuffer) {
        // SAFETY: the caller waited for every submission of `cb`.
        unsafe { self.device.free_command_buffers(self.pool, &[cb]) };
    }

    pub fn fence(&self) -> Result<vk::Fence> {
        // SAFETY: plain creation on a live device.
        unsafe { self.device.create_fence(&vk::FenceCreateInfo::default(), None) }.map_err(VkError::api)
    }

    pub fn destroy_fence(&self, f: vk::Fence) {
        // SAFETY: the caller waited on the fence's last submission.
        unsafe { self.device.destroy_fence(f, None) };
    }

    /// Start recording into `cb` (reset first).
    pub fn begin(&self, cb: vk::CommandBuffer) -> Result<()> {
        // SAFETY: `cb` is not pending (caller waited) and is recorded from this thread only.
        unsafe {
            self.device.reset_command_buffer(cb, vk::CommandBufferResetFlags::empty()).map_err(VkError::api)?;
            self.device.begin_command_buffer(cb, &vk::CommandBufferBeginInfo::default()).map_err(VkError::api)
        }
    }

    pub fn end(&self, cb: vk::CommandBuffer) -> Result<()> {
        // SAFETY: `cb` is in the recording state.
        unsafe { self.device.end_command_buffer(cb) }.map_err(VkError::api)
    }

    /// Record a dispatch of `p` with `push` constants.
    pub fn dispatch(&self, cb: vk::CommandBuffer, p: Pipeline, push: &[u8], groups: [u32; 3]) {
        debug_assert!(push.len() as u32 <= PUSH_BYTES);
        // SAFETY: `cb` is recording; the pipeline and layout are live; push fits the layout's range.
        unsafe {
            self.device.cmd_bind_pipeline(cb, vk::PipelineBindPoint::COMPUTE, p.pipeline);
            self.device.cmd_push_constants(cb, self.layout, vk::ShaderStageFlags::COMPUTE, 0, push);
            self.device.cmd_dispatch(cb, groups[0], groups[1], groups[2]);
        }
    }

    /// A full memory dependency from earlier shader writes (and transfers) to later shader and
    /// transfer accesses.
    pub fn barrier(&self, cb: vk::CommandBuffer) {
        let mb = [vk::MemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::SHADER_WRITE | vk::AccessFlags::TRANSFER_WRITE)
            .dst_access_mask(
                vk::AccessFlags::SHADER_READ
                    | vk::AccessFlags::SHADER_WRITE
                    | vk::AccessFlags::TRANSFER_READ
                    | vk::AccessFlags::TRANSFER_WRITE,
            )];
        let stages = vk::PipelineStageFlags::COMPUTE_SHADER | vk::PipelineStageFlags::TRANSFER;
        // SAFETY: `cb` is recording.
        unsafe { self.device.cmd_pipeline_barrier(cb, stages, stages, vk::DependencyFlags::empty(), &mb, &[], &[]) };
    }

    /// Device writes made visible to host reads of mapped memory.
    pub fn host_barrier(&self, cb: vk::CommandBuffer) {
        let mb = [vk::MemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::SHADER_WRITE | vk::AccessFlags::TRANSFER_WRITE)
            .dst_access_mask(vk::AccessFlags::HOST_READ)];
        let src = vk::PipelineStageFlags::COMPUTE_SHADER | vk::PipelineStageFlags::TRANSFER;
        // SAFETY: `cb` is recording.
        unsafe {
            self.device.cmd_pipeline_barrier(
                cb,
                src,
                vk::PipelineStageFlags::HOST,
                vk::DependencyFlags::empty(),
                &mb,
                &[],
                &[],
            )
        };
    }

    pub fn copy(&self, cb: vk::CommandBuffer, src: &RawBuffer, dst: &RawBuffer, regions: &[vk::BufferCopy]) {
        // SAFETY: `cb` is recording; regions lie inside both buffers (callers check).
        unsafe { self.device.cmd_copy_buffer(cb, src.buffer, dst.buffer, regions) };
    }

    pub fn fill_zero(&self, cb: vk::CommandBuffer, dst: &RawBuffer) {
        // SAFETY: `cb` is recording; the whole buffer is filled.
        unsafe { self.device.cmd_fill_buffer(cb, dst.buffer, 0, vk::WHOLE_SIZE, 0) };
    }

    /// Reset the timestamp queries (recorded at the start of a step).
    pub fn reset_queries(&self, cb: vk::CommandBuffer) {
        if self.query_pool != vk::QueryPool::null() {
            // SAFETY: `cb` is recording; the queries exist.
            unsafe { self.device.cmd_reset_query_pool(cb, self.query_pool, 0, QUERIES) };
        }
    }

    /// Reset queries `first..first + n` only (a step ahead, while another may be writing others).
    pub fn reset_queries_range(&self, cb: vk::CommandBuffer, first: u32, n: u32) {
        if self.query_pool != vk::QueryPool::null() {
            // SAFETY: `cb` is recording; the queries exist (callers keep first + n <= QUERIES).
            unsafe { self.device.cmd_reset_query_pool(cb, self.query_pool, first, n) };
        }
    }

    pub fn timestamp(&self, cb: vk::CommandBuffer, query: u32) {
        if self.query_pool != vk::QueryPool::null() {
            // SAFETY: `cb` is recording; the query was reset earlier in the same command buffer.
            unsafe {
                self.device.cmd_write_timestamp(cb, vk::PipelineStageFlags::ALL_COMMANDS, self.query_pool, query)
            };
        }
    }

    /// Nanoseconds between the two timestamps of the last finished step, if the device has them.
    pub fn step_ns(&self) -> Option<f64> {
        self.step_ns_at(0)
    }

    /// Nanoseconds between the timestamps at queries `first` and `first + 1`.
    pub fn step_ns_at(&self, first: u32) -> Option<f64> {
        if self.query_pool == vk::QueryPool::null() {
            return None;
        }
        let mut t = [0u64; 2]; // on the stack: a decode step allocates nothing
        // SAFETY: the step that wrote these queries finished (fence waited).
        unsafe { self.device.get_query_pool_results(self.query_pool, first, &mut t, vk::QueryResultFlags::TYPE_64) }
            .ok()?;
        Some(t[1].wrapping_sub(t[0]) as f64 * self.info.timestamp_period as f64)
    }

    /// The first `n` timestamps the last finished step wrote, in device ticks.
    pub fn timestamps(&self, n: u32) -> Option<Vec<u64>> {
        if self.query_pool == vk::QueryPool::null() || n > QUERIES {
            return None;
        }
        let mut t = vec![0u64; n as usize];
        // SAFETY: the step that wrote these queries finished (fence waited).
        unsafe { self.device.get_query_pool_results(self.query_pool, 0, &mut t, vk::QueryResultFlags::TYPE_64) }
            .ok()?;
        Some(t)
    }

    /// Submit `cb`, signalling `fence`.
    pub fn submit(&self, cb: vk::CommandBuffer, fence: vk::Fence) -> Result<()> {
        let cbs = [cb];
        let si = [vk::SubmitInfo::default().command_buffers(&cbs)];
        // SAFETY: `cb` is executable; the fence is unsignalled; the queue is used by this thread only.
        unsafe { self.device.queue_submit(self.queue, &si, fence) }.map_err(VkError::api)
    }

    /// Wait for `fence`, then reset it. On a GPU it polls for the first milliseconds: a blocking
    /// wait sleeps, and waking up costs tens of microseconds a step, much of a small model's
    /// decode step. (A CPU device needs the CPU itself, so it is not polled.)
    pub fn wait(&self, fence: vk::Fence) -> Result<()> {
        let start = std::time::Instant::now();
        let poll = if self.info.is_gpu() { std::time::Duration::from_millis(20) } else { std::time::Duration::ZERO };
        // SAFETY: the fence is live and was submitted.
        unsafe {
            while start.elapsed() < poll {
                if self.device.get_fence_status(fence).map_err(VkError::api)? {
                    return self.device.reset_fences(&[fence]).map_err(VkError::api);
                }
                std::hint::spin_loop();
            }
            self.device.wait_for_fences(&[fence], true, u64::MAX).map_err(VkError::api)?;
            self.device.reset_fences(&[fence]).map_err(VkError::api)
        }
    }

    pub fn wait_idle(&self) {
        // SAFETY: a live device; failure (device lost) leaves nothing to wait for.
        let _ = unsafe { self.device.device_wait_idle() };
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        self.wait_idle();
        // SAFETY: the device is idle; every object below was made from it and is destroyed once.
        unsafe {
            for &p in &self.pipelines {
                self.device.destroy_pipeline(p, None);
            }
            for &m in &self.modules {
                self.device.destroy_shader_module(m, None);
            }
            if self.query_pool != vk::QueryPool::null() {
                self.device.destroy_query_pool(self.query_pool, None);
            }
            self.device.destroy_pipeline_cache(self.cache, None);
            self.device.destroy_command_pool(self.pool, None);
            self.device.destroy_pipeline_layout(self.layout, None);
            self.device.destroy_device(None);
        }
    }
}

/// A buffer record with no Vulkan objects, standing in while a real one is lent out.
pub fn placeholder_buffer() -> RawBuffer {
    RawBuffer { buffer: vk::Buffer::null(), memory: vk::DeviceMemory::null(), size: 0, addr: 0, mapped: None }
}

/// `owner[lo..hi]`, where `hi` may pass `owner.len()` up to the end of the page holding
/// `owner`'s last byte. For a memory-mapped file (page-aligned start, whole pages mapped) those
/// bytes are mapped and read as zeros.
pub fn extend_to_page(owner: &[u8], lo: usize, hi: usize) -> &[u8] {
    const PAGE: usize = 4096;
    let limit = (owner.as_ptr() as usize + owner.len()).next_multiple_of(PAGE) - owner.as_ptr() as usize;
    let hi = hi.min(limit);
    let lo = lo.min(hi);
    // SAFETY: `owner` is a file mapping (callers check `HostBytes::is_mapped`): its start is
    // page-aligned and the kernel maps whole pages, so `[lo, hi)` with `hi` at most the end of the
    // last page lies in mapped, readable memory that lives as long as `owner`.
    unsafe { std::slice::from_raw_parts(owner.as_ptr().add(lo), hi - lo) }
}

/// `spirv` without its request to keep f32 denormals (`OpCapability DenormPreserve`,
/// `OpExecutionMode … DenormPreserve 32`), for a device that does not offer it (Debian 12's
/// lavapipe, which keeps them anyway, being a CPU). Other instructions are kept as they are.
pub fn without_denorm_preserve(spirv: &[u32]) -> Vec<u32> {
    const OP_EXECUTION_MODE: u32 = 16;
    const OP_CAPABILITY: u32 = 17;
    const DENORM_PRESERVE_MODE: u32 = 4459;
    const DENORM_PRESERVE_CAP: u32 = 4464;
    let mut out = spirv[..spirv.len().min(5)].to_vec(); // the header
    let mut i = 5;
    while i < spirv.len() {
        let (len, op) = ((spirv[i] >> 16) as usize, spirv[i] & 0xFFFF);
        let inst = &spirv[i..(i + len.max(1)).min(spirv.len())];
        let drop = (op == OP_CAPABILITY && inst.get(1) == Some(&DENORM_PRESERVE_CAP))
            || (op == OP_EXECUTION_MODE && inst.get(2) == Some(&DENORM_PRESERVE_MODE));
        if !drop {
            out.extend_from_slice(inst);
        }
        i += len.max(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every embedded shader asks to keep denormals, and the stripped module keeps everything else.
    #[test]
    fn denorm_preserve_is_requested_and_strippable() {
        for (name, bytes) in crate::kernels::SPIRV {
            let words: Vec<u32> = bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let stripped = without_denorm_preserve(&words);
            // OpCapability DenormPreserve (2 words) and OpExecutionMode %main DenormPreserve 32 (4).
            assert_eq!(words.len() - stripped.len(), 6, "{name}");
            assert_eq!(stripped[..5], words[..5], "{name}: header");
            assert!(!stripped.windows(2).any(|w| w == [(2 << 16) | 17, 4464]), "{name}");
        }
    }
}
