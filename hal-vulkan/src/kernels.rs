//! The shaders' push-constant blocks, mirrored as `#[repr(C)]` structs (each with a size
//! assertion against the GLSL block), and the table of compiled SPIR-V.

use bytemuck::{Pod, Zeroable};
use purehw_hal::Format;

include!(concat!(env!("OUT_DIR"), "/shaders.rs"));

/// A device address as a shader's `uvec2` reads it.
pub type Addr = [u32; 2];

pub fn addr(a: u64) -> Addr {
    [a as u32, (a >> 32) as u32]
}

/// The address an [`Addr`] holds.
pub fn addr_u64(a: Addr) -> u64 {
    u64::from(a[0]) | u64::from(a[1]) << 32
}

/// `common/mm.glsl`'s `Push`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
pub struct MmPush {
    pub w: Addr,
    pub x: Addr,
    pub out: Addr,
    pub w_byte: u32,
    pub x_off: u32,
    pub out_off: u32,
    pub rows: u32,
    pub cols: u32,
    pub n: u32,
    pub row_bytes: u32,
    pub x_stride: u32,
}
const _: () = assert!(core::mem::size_of::<MmPush>() == 56);

/// `embed.comp`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
pub struct EmbedPush {
    pub table: Addr,
    pub out: Addr,
    pub step: Addr,
    pub t_byte: u32,
    pub row_bytes: u32,
    pub cols: u32,
    pub rows: u32,
    pub out_off: u32,
    pub tokens_off: u32,
    pub scale: f32,
    pub vocab: u32,
}
const _: () = assert!(core::mem::size_of::<EmbedPush>() == 56);

/// `bandwidth.comp`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
pub struct BandwidthPush {
    pub src: Addr,
    /// 16-byte loads in the buffer.
    pub quads: u32,
    pub pad: u32,
}
const _: () = assert!(core::mem::size_of::<BandwidthPush>() == 16);

/// `exact_probe.comp`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
pub struct ExactPush {
    pub a: Addr,
    pub b: Addr,
    pub q: Addr,
    pub r: Addr,
    pub n: u32,
    /// A timed dependent chain of this many division + root steps in one invocation (0: none).
    pub chain: u32,
}
const _: () = assert!(core::mem::size_of::<ExactPush>() == 40);

/// `mm_int.comp`: [`MmPush`]'s fields, then the integer weight's parts.
#[repr(C)]
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
pub struct MmIntPush {
    pub mm: MmPush,
    pub scales: Addr,
    pub zeros: Addr,
    /// Columns per scale group (the row's length when per channel).
    pub group: u32,
    pub groups: u32,
    pub iflags: u32,
}
const _: () = assert!(core::mem::size_of::<MmIntPush>() == 84);

/// `embed_int.comp`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
pub struct EmbedIntPush {
    pub table: Addr,
    pub out: Addr,
    pub step: Addr,
    pub scales: Addr,
    pub zeros: Addr,
    pub t_byte: u32,
    pub row_bytes: u32,
    pub cols: u32,
    pub rows: u32,
    pub out_off: u32,
    pub tokens_off: u32,
    pub scale: f32,
    pub group: u32,
    pub groups: u32,
    pub iflags: u32,
    pub vocab: u32,
}
const _: () = assert!(core::mem::size_of::<EmbedIntPush>() == 84);

/// `common/int.glsl`'s flags for a compressed-tensors format.
pub fn int_flags(p: purehw_kernels::quant::PackedInt) -> u32 {
    use purehw_kernels::quant::{Codes, ScaleType};
    (if p.bits == 4 { 1 } else { 0 })
        | (if p.codes == Codes::I8 { 2 } else { 0 })
        | (if p.symmetric { 0 } else { 4 })
        | match p.scale {
            ScaleType::F32 => 0,
            ScaleType::F16 => 8,
            ScaleType::BF16 => 16,
        }
}

/// `norm.comp`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
pub struct NormPush {
    pub x: Addr,
    pub branch: Addr,
    pub out: Addr,
    pub w: Addr,
    pub post: Addr,
    pub q: Addr,
    pub x_out: Addr,
    pub x_off: u32,
    pub br_off: u32,
    pub out_off: u32,
    pub q_off: u32,
    pub x_out_off: u32,
    pub dim: u32,
    pub flags: u32,
    pub eps: f32,
}
const _: () = assert!(core::mem::size_of::<NormPush>() == 88);

/// `norm.comp`'s flags and its shared row's size.
pub const NORM_BRANCH: u32 = 1;
pub const NORM_POST: u32 = 2;
pub const NORM_QA: u32 = 4;
pub const NORM_QK: u32 = 8;
pub const NORM_SHARED: u32 = 16;
pub const NORM_MAX_DIM: usize = 6144;

/// `mm_split.comp` with PRO=1: the AddRmsNorm before the matmul as its prologue.
#[repr(C)]
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
pub struct SplitNormPush {
    pub w: Addr,
    pub q: Addr,
    pub out: Addr,
    pub x_in: Addr,
    pub branch: Addr,
    pub post: Addr,
    pub nw: Addr,
    pub x_out: Addr,
    pub nout: Addr,
    pub w_byte: u32,
    pub q_off: u32,
    pub out_off: u32,
    pub rows: u32,
    pub cols: u32,
    pub row_bytes: u32,
    pub x_in_off: u32,
    pub br_off: u32,
    pub x_out_off: u32,
    pub nout_off: u32,
    pub flags: u32,
    pub eps: f32,
}
const _: () = assert!(core::mem::size_of::<SplitNormPush>() == 120);

/// `mm_split.comp` with PRO=2: GatedFfn's activation and quantization as the prologue.
#[repr(C)]
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
pub struct SplitGatePush {
    pub w: Addr,
    pub q: Addr,
    pub out: Addr,
    pub gate: Addr,
    pub up: Addr,
    pub act: Addr,
    pub w_byte: u32,
    pub q_off: u32,
    pub out_off: u32,
    pub rows: u32,
    pub cols: u32,
    pub row_bytes: u32,
    pub gate_off: u32,
    pub up_off: u32,
    pub act_off: u32,
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<SplitGatePush>() == 88);

/// `mm_split.comp` with PRO=3: the AddRmsNorm after the matmul (its branch) as the group's tail.
/// Addresses carry their offsets.
#[repr(C)]
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
pub struct TailNormPush {
    pub w: Addr,
    pub x: Addr,
    pub out: Addr,
    pub q: Addr,
    pub x_in: Addr,
    pub post: Addr,
    pub nw: Addr,
    pub x_out: Addr,
    pub nout: Addr,
    pub ctr: Addr,
    pub w_byte: u32,
    pub rows: u32,
    pub cols: u32,
    pub row_bytes: u32,
    pub total: u32,
    pub flags: u32,
    pub eps: f32,
}
const _: () = assert!(core::mem::size_of::<TailNormPush>() == 108);

/// `mm_split.comp` with PRO=4: GatedFfn's activation and quantization as the tail of the gate
/// and up matmuls.
#[repr(C)]
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
pub struct TailGatePush {
    pub w: Addr,
    pub x: Addr,
    pub out: Addr,
    pub q: Addr,
    pub gate: Addr,
    pub up: Addr,
    pub act: Addr,
    pub ctr: Addr,
    pub w_byte: u32,
    pub rows: u32,
    pub cols: u32,
    pub row_bytes: u32,
    pub total: u32,
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<TailGatePush>() == 88);

/// `mm_split.comp` with PRO=5: Qkv's epilogue as the tail of the q, k and v matmuls. Addresses
/// carry their offsets, the weight's too.
#[repr(C)]
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
pub struct TailQkvPush {
    pub w: Addr,
    pub x: Addr,
    pub out: Addr,
    pub q: Addr,
    pub k: Addr,
    pub v: Addr,
    pub qn: Addr,
    pub kn: Addr,
    pub kc: Addr,
    pub vc: Addr,
    pub step: Addr,
    pub ctr: Addr,
    pub rows: u32,
    pub cols: u32,
    pub row_bytes: u32,
    pub total: u32,
    /// heads | kv_heads << 8 | head_dim << 16.
    pub shape: u32,
    /// `QP_*` flags | kind (0 q, 1 k, 2 v) << 6 | the RoPE table's word offset << 8.
    pub flags_table: u32,
    pub eps: f32,
    /// Rows a slot of ring caches (`Op::Qkv`'s `ring`); 0: linear.
    pub ring: u32,
}
const _: () = assert!(core::mem::size_of::<TailQkvPush>() == 128);

/// `mm_split.comp` with PRO=6: the Argmax of the matmul's output as its tail.
#[repr(C)]
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
pub struct TailArgmaxPush {
    pub w: Addr,
    pub x: Addr,
    pub out: Addr,
    pub part: Addr,
    pub amax: Addr,
    pub ctr: Addr,
    pub w_byte: u32,
    pub rows: u32,
    pub cols: u32,
    pub row_bytes: u32,
    pub total: u32,
}
const _: () = assert!(core::mem::size_of::<TailArgmaxPush>() == 68);

/// Counters the tails of one step may use (one per segment of each tail group), and the most
/// segments one group may have.
pub const TAIL_COUNTERS: usize = 8192;
pub const TAIL_GROUP_MAX: usize = 512;

/// Prologue flags of `mm_split.comp`.
pub const PRO_BRANCH: u32 = 1;
pub const PRO_POST: u32 = 2;
pub const PRO_SILU: u32 = 1;
pub const PRO_QK: u32 = 4;
pub const PRO_WRITER: u32 = 8;
/// Longest row a prologue holds (`PRO_MAX`).
pub const PRO_MAX_DIM: usize = 2048;
/// The most rows a matmul with a norm prologue may have (each workgroup repeats the prologue).
pub const PRO_MAX_ROWS: usize = 16384;
/// Prologues taken by default: (norm, gate), both off. Every workgroup of the matmul repeats the
/// prologue; once the decode matmuls spread over 256 workgroups (`SPLIT_WG`) that repeated work
/// costs more than the dispatch and barrier it saves. H100, tg128 Gemma 3 270M / SmolLM2 with
/// 256 workgroups: none 690 / 544, norm 559 / 468, gate 584 / 450, all 506 / 429 tokens/s.
pub const PROLOGUES: (bool, bool) = (false, false);

/// `act_quant.comp`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
pub struct ActQuantPush {
    pub x: Addr,
    pub up: Addr,
    pub g: Addr,
    pub q: Addr,
    pub x_off: u32,
    pub up_off: u32,
    pub g_off: u32,
    pub q_off: u32,
    pub cols: u32,
    pub op: u32,
}
const _: () = assert!(core::mem::size_of::<ActQuantPush>() == 56);

pub const AQ_PLAIN: u32 = 0;
pub const AQ_GELU: u32 = 1;
pub const AQ_SILU: u32 = 2;

/// `qkv_post.comp`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
pub struct QkvPostPush {
    pub q: Addr,
    pub k: Addr,
    pub v: Addr,
    pub qn: Addr,
    pub kn: Addr,
    pub kc: Addr,
    pub vc: Addr,
    pub step: Addr,
    pub q_off: u32,
    pub k_off: u32,
    pub v_off: u32,
    pub kc_off: u32,
    pub vc_off: u32,
    pub row_seq_off: u32,
    pub seqs_off: u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub flags: u32,
    pub table_off: u32,
    pub eps: f32,
    /// Rows a slot of ring caches (`Op::Qkv`'s `ring`); 0: linear.
    pub ring: u32,
}
const _: () = assert!(core::mem::size_of::<QkvPostPush>() == 120);

pub const QP_QNORM: u32 = 1;
pub const QP_KNORM: u32 = 2;
pub const QP_ROPE: u32 = 4;
pub const QP_NEOX: u32 = 8;
pub const QP_KCACHE: u32 = 16;
pub const QP_VCACHE: u32 = 32;
pub const QP_MAX_HEAD_DIM: usize = 512;

/// `rope.comp`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
pub struct RopePush {
    pub x: Addr,
    pub step: Addr,
    pub x_off: u32,
    pub rows: u32,
    pub heads: u32,
    pub head_dim: u32,
    pub table_off: u32,
    pub neox: u32,
}
const _: () = assert!(core::mem::size_of::<RopePush>() == 40);

/// `store_kv.comp`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
pub struct StoreKvPush {
    pub cache: Addr,
    pub src: Addr,
    pub step: Addr,
    pub cache_off: u32,
    pub src_off: u32,
    pub width: u32,
    pub rows: u32,
    pub row_seq_off: u32,
    pub seqs_off: u32,
    /// Rows a slot of a ring cache (`Op::StoreKv`'s `ring`); 0: linear.
    pub ring: u32,
}
const _: () = assert!(core::mem::size_of::<StoreKvPush>() == 52);

/// `attention.comp`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
pub struct AttnPush {
    pub out: Addr,
    pub q: Addr,
    pub k: Addr,
    pub v: Addr,
    pub step: Addr,
    pub out_off: u32,
    pub q_off: u32,
    pub k_off: u32,
    pub v_off: u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub window: u32,
    pub row_seq_off: u32,
    pub seqs_off: u32,
    pub scale: f32,
    pub softcap: f32,
    pub qout: Addr,
    pub qout_off: u32,
    pub qmode: u32,
    /// Rows of the step (`attention_blk.comp`'s last block may be partial).
    pub rows: u32,
    /// Rows a slot of a ring cache (`Op::Attention`'s `ring`); 0: linear.
    pub ring: u32,
}
const _: () = assert!(core::mem::size_of::<AttnPush>() == 112);

/// `attention_blk.comp`: the most rows per workgroup (its `QB`), and the fewest rows a step
/// needs to take it (below, one row per workgroup keeps more workgroups in flight).
pub const ATTN_BLK_ROWS: usize = 8;
pub const ATTN_BLK_MIN_ROWS: usize = 32;

/// `attention.comp`'s largest head.
pub const ATTN_MAX_HEAD_DIM: usize = 512;

/// `eltwise.comp`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
pub struct EltPush {
    pub out: Addr,
    pub a: Addr,
    pub b: Addr,
    pub out_off: u32,
    pub a_off: u32,
    pub b_off: u32,
    pub len: u32,
    pub op: u32,
    pub cap: f32,
}
const _: () = assert!(core::mem::size_of::<EltPush>() == 48);

pub const ELT_ADD: u32 = 0;
pub const ELT_GELU_MUL: u32 = 1;
pub const ELT_SILU_MUL: u32 = 2;
pub const ELT_SOFTCAP: u32 = 3;

/// `argmax.comp`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
pub struct ArgmaxPush {
    pub out: Addr,
    pub x: Addr,
    pub part: Addr,
    pub out_off: u32,
    pub x_off: u32,
    pub part_off: u32,
    pub cols: u32,
}
const _: () = assert!(core::mem::size_of::<ArgmaxPush>() == 40);

/// Columns per stage-1 workgroup of `argmax.comp`.
pub const ARGMAX_CHUNK: usize = 4096;

/// The shader-variant suffix of a format (`common/base.glsl`'s FMT_* names).
pub fn fmt_name(f: Format) -> &'static str {
    f.name()
}

/// The SPIR-V of a shader variant, e.g. `"mm_q8.Q4_K"`.
pub fn spirv(name: &str) -> Option<&'static [u8]> {
    SPIRV.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}
