// Weight formats as the kernels read them, selected by FMT (one shader variant per format).
// Offsets are in bytes from the start of a row; every formula is the reference's
// (purehw_kernels::quant::blocks / act), operation for operation.

#if FMT == FMT_F32
#define BLOCK_ELEMS 1
#define BLOCK_BYTES 4
#elif FMT == FMT_F16 || FMT == FMT_BF16
#define BLOCK_ELEMS 1
#define BLOCK_BYTES 2
#elif FMT == FMT_Q4_0
#define BLOCK_ELEMS 32
#define BLOCK_BYTES 18
#elif FMT == FMT_Q4_1
#define BLOCK_ELEMS 32
#define BLOCK_BYTES 20
#elif FMT == FMT_Q5_0
#define BLOCK_ELEMS 32
#define BLOCK_BYTES 22
#elif FMT == FMT_Q5_1
#define BLOCK_ELEMS 32
#define BLOCK_BYTES 24
#elif FMT == FMT_Q8_0
#define BLOCK_ELEMS 32
#define BLOCK_BYTES 34
#elif FMT == FMT_Q4_K
#define BLOCK_ELEMS 256
#define BLOCK_BYTES 144
#elif FMT == FMT_Q5_K
#define BLOCK_ELEMS 256
#define BLOCK_BYTES 176
#elif FMT == FMT_Q6_K
#define BLOCK_ELEMS 256
#define BLOCK_BYTES 210
#endif

#if FMT == FMT_Q4_K || FMT == FMT_Q5_K
// (scale, min) of sub-block g from the 12 packed bytes at `s` (scale_min_k4).
uvec2 scale_min_k4(Words w, uint s, uint g) {
    if (g < 4u) return uvec2(ld_u8(w, s + g) & 63u, ld_u8(w, s + g + 4u) & 63u);
    uint hi = ld_u8(w, s + g + 4u);
    return uvec2((hi & 15u) | ((ld_u8(w, s + g - 4u) >> 6) << 4), (hi >> 4) | ((ld_u8(w, s + g) >> 6) << 4));
}
#endif

// Element j of the block starting at byte `b`, dequantized exactly as dequantize_row does.
float deq(Words w, uint b, uint j) {
#if FMT == FMT_F32
    return uintBitsToFloat(ld_u32(w, b));
#elif FMT == FMT_F16
    return f16_to_f32(ld_u16(w, b));
#elif FMT == FMT_BF16
    return bf16_to_f32(ld_u16(w, b));
#elif FMT == FMT_Q4_0 || FMT == FMT_Q4_1 || FMT == FMT_Q5_0 || FMT == FMT_Q5_1
#if FMT == FMT_Q4_0
    const uint QS = 2u;
#elif FMT == FMT_Q4_1
    const uint QS = 4u;
#elif FMT == FMT_Q5_0
    const uint QS = 6u;
#else
    const uint QS = 8u;
#endif
    uint byte = ld_u8(w, b + QS + (j & 15u));
    uint q = j < 16u ? (byte & 15u) : (byte >> 4);
#if FMT == FMT_Q5_0
    q |= ((ld_u32(w, b + 2u) >> j) & 1u) << 4;
#elif FMT == FMT_Q5_1
    q |= ((ld_u32(w, b + 4u) >> j) & 1u) << 4;
#endif
    precise float d = f16_to_f32(ld_u16(w, b));
#if FMT == FMT_Q4_0
    precise float r = d * float(int(q) - 8);
#elif FMT == FMT_Q5_0
    precise float r = d * float(int(q) - 16);
#else
    precise float r = d * float(q) + f16_to_f32(ld_u16(w, b + 2u));
#endif
    return r;
#elif FMT == FMT_Q8_0
    precise float r = float(sbyte(ld_u8(w, b + 2u + j), 0u)) * f16_to_f32(ld_u16(w, b));
    return r;
#elif FMT == FMT_Q4_K || FMT == FMT_Q5_K
    uint g = j >> 5, i = j & 31u;
    uvec2 sm = scale_min_k4(w, b + 4u, g);
#if FMT == FMT_Q4_K
    const uint QS = 16u;
#else
    const uint QS = 48u;
#endif
    uint q = (ld_u8(w, b + QS + 32u * (g >> 1) + i) >> (4u * (g & 1u))) & 15u;
#if FMT == FMT_Q5_K
    q |= ((ld_u8(w, b + 16u + i) >> g) & 1u) << 4;
#endif
    precise float dl = f16_to_f32(ld_u16(w, b)) * float(sm.x);
    precise float ml = f16_to_f32(ld_u16(w, b + 2u)) * float(sm.y);
    precise float r = dl * float(q) - ml;
    return r;
#elif FMT == FMT_Q6_K
    uint s = j >> 4, c = j >> 7, r7 = j & 127u;
    uint lo = (ld_u8(w, b + 64u * c + (r7 & 63u)) >> (4u * (r7 >> 6))) & 15u;
    uint hi = (ld_u8(w, b + 128u + 32u * c + (r7 & 31u)) >> (2u * (r7 >> 5))) & 3u;
    precise float dl = f16_to_f32(ld_u16(w, b + 208u)) * float(sbyte(ld_u8(w, b + 192u + s), 0u));
    precise float r = dl * float(int(lo | (hi << 4)) - 32);
    return r;
#endif
}

// Signed dot product of two words of four signed bytes (exact).
#if defined(DOT) && DOT == 1
// OpSDot on packed 4x8-bit operands (SPV_KHR_integer_dot_product): glslang 15.1 has no GLSL
// name for it yet.
#extension GL_EXT_spirv_intrinsics : require
spirv_instruction(extensions = ["SPV_KHR_integer_dot_product"], capabilities = [6019, 6018], id = 4450)
int sdot_packed(uint a, uint b, spirv_literal int format);
int dot4(uint a, uint b) {
    return sdot_packed(a, b, 0);
}
#else
int dot4(uint a, uint b) {
    return sbyte(a, 0u) * sbyte(b, 0u) + sbyte(a, 1u) * sbyte(b, 1u) + sbyte(a, 2u) * sbyte(b, 2u) +
           sbyte(a, 3u) * sbyte(b, 3u);
}
#endif

// Four bytes each minus `o` (0 ≤ byte < 128, o ≤ 128), as signed bytes: no borrow crosses bytes.
uint sub_bytes(uint x, uint o) {
    return ((x | 0x80808080u) - o * 0x01010101u) ^ 0x80808080u;
}

// The four low bits of `nib` (bits 0..3) as bit 4 of four bytes.
uint spread4(uint nib) {
    return ((nib & 1u) << 4) | ((nib & 2u) << 11) | ((nib & 4u) << 18) | ((nib & 8u) << 25);
}

#if BLOCK_ELEMS == 32 && FMT != FMT_F32
// A 32-element block for the integer dot: lane k's four codes (packed signed bytes), the scale
// d and the offset m (Codes32 of decode_q8a_row).
void block32(Words w, uint b, uint k, out uint codes, out float d, out float m) {
    d = f16_to_f32(ld_u16(w, b));
    m = 0.0;
#if FMT == FMT_Q8_0
    codes = ld_u32(w, b + 2u + 4u * k);
#else
#if FMT == FMT_Q4_0
    const uint QS = 2u;
#elif FMT == FMT_Q4_1
    const uint QS = 4u;
#elif FMT == FMT_Q5_0
    const uint QS = 6u;
#else
    const uint QS = 8u;
#endif
    uint x = ld_u32(w, b + QS + 4u * (k & 3u));
    x = (k < 4u ? x : (x >> 4)) & 0x0F0F0F0Fu;
#if FMT == FMT_Q5_0
    x |= spread4(ld_u32(w, b + 2u) >> (4u * k));
#elif FMT == FMT_Q5_1
    x |= spread4(ld_u32(w, b + 4u) >> (4u * k));
#endif
#if FMT == FMT_Q4_0
    x = sub_bytes(x, 8u);
#elif FMT == FMT_Q5_0
    x = sub_bytes(x, 16u);
#else
    m = f16_to_f32(ld_u16(w, b + 2u));
#endif
    codes = x;
#endif
}
#endif

#if BLOCK_ELEMS == 256
// Lane k of chunk c (elements 32c + 4k .. +4) of a k-quant super-block at byte `b`: the four
// codes (packed signed bytes) and the integer scale that multiplies their lane sum.
void chunk256(Words w, uint b, uint c, uint k, out uint codes, out int sc) {
#if FMT == FMT_Q4_K || FMT == FMT_Q5_K
#if FMT == FMT_Q4_K
    const uint QS = 16u;
#else
    const uint QS = 48u;
#endif
    uint x = (ld_u32(w, b + QS + 32u * (c >> 1) + 4u * k) >> (4u * (c & 1u))) & 0x0F0F0F0Fu;
#if FMT == FMT_Q5_K
    x |= ((ld_u32(w, b + 16u + 4u * k) >> c) & 0x01010101u) << 4;
#endif
    codes = x;
    sc = int(scale_min_k4(w, b + 4u, c).x);
#else
    uint h = c >> 2, cc = c & 3u;
    uint lo = (ld_u32(w, b + 64u * h + 32u * (cc & 1u) + 4u * k) >> (4u * (cc >> 1))) & 0x0F0F0F0Fu;
    uint hi = (ld_u32(w, b + 128u + 32u * h + 4u * k) >> (2u * cc)) & 0x03030303u;
    codes = sub_bytes(lo | (hi << 4), 32u);
    sc = sbyte(ld_u8(w, b + 192u + 2u * c + (k >> 2)), 0u);
#endif
}

// d, dmin of a k-quant super-block (Q6_K: dmin 0).
vec2 superblock_scales(Words w, uint b) {
#if FMT == FMT_Q6_K
    return vec2(f16_to_f32(ld_u16(w, b + 208u)), 0.0);
#else
    return vec2(f16_to_f32(ld_u16(w, b)), f16_to_f32(ld_u16(w, b + 2u)));
#endif
}

// Σ_g mn[g]·(bsum[2g] + bsum[2g+1]) for the minimums (0 for Q6_K); `bs` = word index of bsums.
int superblock_mins(Words w, uint b, Words a, uint bs) {
#if FMT == FMT_Q6_K
    return 0;
#else
    int m = 0;
    for (uint g = 0u; g < 8u; g++) {
        uint pair = a.v[bs + g];   // bsum[2g] (low half), bsum[2g+1] (high half)
        int s = (int(pair << 16) >> 16) + (int(pair) >> 16);
        m += int(scale_min_k4(w, b + 4u, g).y) * s;
    }
    return m;
#endif
}
#endif

#if BLOCK_ELEMS > 1
// The lane's elements lane + 8j (j < BLOCK_ELEMS/8) of the block at byte `b`, dequantized as
// `deq` does, with the block's scales read once.
void deq_lane(Words w, uint b, uint lane, out float v[BLOCK_ELEMS / 8]) {
#if BLOCK_ELEMS == 32
#if FMT == FMT_Q8_0
    precise float d = f16_to_f32(ld_u16(w, b));
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        precise float r = float(sbyte(ld_u8(w, b + 2u + lane + 8u * j), 0u)) * d;
        v[j] = r;
    }
#else
#if FMT == FMT_Q4_0
    const uint QS = 2u;
#elif FMT == FMT_Q4_1
    const uint QS = 4u;
#elif FMT == FMT_Q5_0
    const uint QS = 6u;
#else
    const uint QS = 8u;
#endif
    precise float d = f16_to_f32(ld_u16(w, b));
#if FMT == FMT_Q4_1 || FMT == FMT_Q5_1
    precise float m = f16_to_f32(ld_u16(w, b + 2u));
#endif
#if FMT == FMT_Q5_0
    uint qh = ld_u32(w, b + 2u);
#elif FMT == FMT_Q5_1
    uint qh = ld_u32(w, b + 4u);
#endif
    uint b0 = ld_u8(w, b + QS + lane), b1 = ld_u8(w, b + QS + lane + 8u);
    uint q[4] = uint[4](b0 & 15u, b1 & 15u, b0 >> 4, b1 >> 4);   // elements lane, +8, +16, +24
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        uint qq = q[j];
#if FMT == FMT_Q5_0 || FMT == FMT_Q5_1
        qq |= ((qh >> (lane + 8u * j)) & 1u) << 4;
#endif
#if FMT == FMT_Q4_0
        precise float r = d * float(int(qq) - 8);
#elif FMT == FMT_Q5_0
        precise float r = d * float(int(qq) - 16);
#else
        precise float r = d * float(qq) + m;
#endif
        v[j] = r;
    }
#endif
#else
    // k-quants: the lane's 32 elements, four per 32-element sub-block g.
#if FMT == FMT_Q6_K
    precise float d = f16_to_f32(ld_u16(w, b + 208u));
    [[unroll]] for (uint j = 0u; j < 32u; j++) {
        uint e = lane + 8u * j, c = e >> 7, r7 = e & 127u;
        uint lo = (ld_u8(w, b + 64u * c + (r7 & 63u)) >> (4u * (r7 >> 6))) & 15u;
        uint hi = (ld_u8(w, b + 128u + 32u * c + (r7 & 31u)) >> (2u * (r7 >> 5))) & 3u;
        precise float dl = d * float(sbyte(ld_u8(w, b + 192u + (e >> 4)), 0u));
        precise float r = dl * float(int(lo | (hi << 4)) - 32);
        v[j] = r;
    }
#else
#if FMT == FMT_Q4_K
    const uint QS = 16u;
#else
    const uint QS = 48u;
#endif
    float d = f16_to_f32(ld_u16(w, b)), dmin = f16_to_f32(ld_u16(w, b + 2u));
    [[unroll]] for (uint g = 0u; g < 8u; g++) {
        uvec2 sm = scale_min_k4(w, b + 4u, g);
        precise float dl = d * float(sm.x);
        precise float ml = dmin * float(sm.y);
        [[unroll]] for (uint k = 0u; k < 4u; k++) {
            uint i = lane + 8u * k;   // element within the sub-block
            uint q = (ld_u8(w, b + QS + 32u * (g >> 1) + i) >> (4u * (g & 1u))) & 15u;
#if FMT == FMT_Q5_K
            q |= ((ld_u8(w, b + 16u + i) >> g) & 1u) << 4;
#endif
            precise float r = dl * float(q) - ml;
            v[4u * g + k] = r;
        }
    }
#endif
#endif
}
#endif
