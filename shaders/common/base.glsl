// Shared declarations: buffer references, weight format ids, byte loads, f16/bf16 widening.
// Every buffer is reached by its device address (VK_KHR_buffer_device_address), passed in push
// constants as a uvec2; offsets are in 32-bit words or bytes, as each kernel says.
#extension GL_EXT_buffer_reference : require
#extension GL_EXT_buffer_reference_uvec2 : require
#extension GL_EXT_control_flow_attributes : require
#extension GL_EXT_spirv_intrinsics : require

// f32 denormals kept, as the reference keeps them: without this NVIDIA flushes them to zero
// (SPIR-V DenormPreserve, execution mode 4459 with capability 4464; the device must report
// shaderDenormPreserveFloat32).
spirv_execution_mode(capabilities = [4464], 4459, 32);

layout(buffer_reference, std430, buffer_reference_align = 4) buffer Words { uint v[]; };
layout(buffer_reference, std430, buffer_reference_align = 4) buffer Floats { float v[]; };
layout(buffer_reference, std430, buffer_reference_align = 4) buffer Ints { int v[]; };

// Weight formats (purehw_kernels::Format), in the order of Format::ALL.
#define FMT_F32 0
#define FMT_F16 1
#define FMT_BF16 2
#define FMT_Q4_0 3
#define FMT_Q4_1 4
#define FMT_Q5_0 5
#define FMT_Q5_1 6
#define FMT_Q8_0 7
#define FMT_Q4_K 8
#define FMT_Q5_K 9
#define FMT_Q6_K 10

// Byte `b` of a word array (little-endian).
uint ld_u8(Words w, uint b) {
    return (w.v[b >> 2] >> ((b & 3u) * 8u)) & 0xFFu;
}

// The 16-bit value at byte `b` (b even).
uint ld_u16(Words w, uint b) {
    return (w.v[b >> 2] >> ((b & 2u) * 8u)) & 0xFFFFu;
}

// The 32-bit value at byte `b`, any alignment.
uint ld_u32(Words w, uint b) {
    uint i = b >> 2, s = (b & 3u) * 8u;
    uint lo = w.v[i];
    if (s == 0u) return lo;
    return (lo >> s) | (w.v[i + 1u] << (32u - s));
}

// IEEE half to float, exactly (subnormals included) by integer means: no reliance on the
// device's conversion of denormals.
float f16_to_f32(uint h) {
    // Normal numbers, zeros, infinities and NaNs widen exactly through the hardware path; only
    // subnormal halves (which a device may flush) take the integer path.
    if ((h & 0x7C00u) != 0u || (h & 0x3FFu) == 0u) return unpackHalf2x16(h).x;
    uint s = (h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1Fu) return uintBitsToFloat(s | 0x7F800000u | (m << 13));
    if (e != 0u) return uintBitsToFloat(s | ((e + 112u) << 23) | (m << 13));
    if (m == 0u) return uintBitsToFloat(s);
    // subnormal half: m · 2^-24, a normal float with its leading bit at findMSB(m)
    int msb = findMSB(m);
    return uintBitsToFloat(s | (uint(msb + 103) << 23) | ((m << uint(23 - msb)) & 0x7FFFFFu));
}

float bf16_to_f32(uint h) {
    return uintBitsToFloat(h << 16);
}

// Signed byte `i` of a packed word.
int sbyte(uint w, uint i) {
    return int(w << (24u - 8u * i)) >> 24;
}

// The token id of an embedding row at word `at` of `src`: the step's u32 ids, or (`ids`,
// EmbedIds) an f32 index a last step's argmax left, taken as purehw_kernels::ops::token_of takes
// it: truncated, NaN and negatives to 0, clamped to the table's `rows`.
uint embed_token(uvec2 src, uint at, bool ids, uint rows) {
    if (!ids) return Words(src).v[at];
    float f = Floats(src).v[at];
    return f >= 0.0 ? min(uint(min(f, 4294967040.0)), rows - 1u) : 0u;
}
