// KV caches of f32 or of f16 (hal KvType::F16: two elements a word, element 2i in the low
// half), chosen by the including shader's `KV16` specialization constant (0: f32).

// An f32 rounded to f16 bits, to nearest with ties to even, as half::f16::from_f32 rounds it
// (integer arithmetic: no reliance on the device's conversion, its rounding or its denormals).
uint f32_to_f16(float f) {
    uint x = floatBitsToUint(f);
    uint s = (x >> 16) & 0x8000u, e = (x >> 23) & 0xFFu, m = x & 0x7FFFFFu;
    if (e == 0xFFu) return s | 0x7C00u | (m != 0u ? 0x200u : 0u) | (m >> 13);   // inf; NaN quieted
    int ue = int(e) - 127;
    if (ue > 15) return s | 0x7C00u;
    uint hm, rest, halfway;
    if (ue >= -14) {
        hm = (uint(ue + 15) << 10) | (m >> 13);
        rest = m & 0x1FFFu;
        halfway = 0x1000u;
    } else {
        if (ue < -25) return s;
        uint full = m | 0x800000u, sh = uint(-1 - ue);   // 14..24
        hm = full >> sh;
        rest = full & ((1u << sh) - 1u);
        halfway = 1u << (sh - 1u);
    }
    // A carry out of the significand moves to the next exponent (up to infinity), as it should.
    if (rest > halfway || (rest == halfway && (hm & 1u) != 0u)) hm += 1u;
    return s | hm;
}

// An f16's value, exactly, without branches (so a kernel can issue many cache loads before
// their uses): a normal half, infinity or NaN through the device's conversion (exact for
// those), a subnormal one as m·2^-24 (a normal float: no flush to zero can touch it).
float kv_f16(uint h) {
    uint a = h & 0x7FFFu;
    float sub = uintBitsToFloat(floatBitsToUint(float(a) * 5.9604644775390625e-8) | ((h & 0x8000u) << 16));
    return a < 0x400u ? sub : unpackHalf2x16(h).x;
}

// The cache element at `idx`, an index in f32 words from the cache's word offset `off`
// (`off + element`, as an f32 cache is addressed): read through `f` or, with KV16, widened
// exactly from its half of word `off + element / 2` of `w` (the same buffer).
float kv_ld(Floats f, Words w, uint off, uint idx) {
    if (KV16 == 0u) return f.v[idx];
    uint e = idx - off, x = w.v[off + (e >> 1)];
    return kv_f16((x >> ((e & 1u) << 4)) & 0xFFFFu);
}

// Store `hd` values of `h` (elements `e0 ..`, e0 even for KV16) from word offset `off` of a cache,
// invocation `tid` of 256.
#define KV_STORE_ROW(buf, off, e0, h, hd, tid)                                                    \
    if (KV16 == 0u) {                                                                            \
        for (uint i_ = tid; i_ < hd; i_ += 256u) Floats(buf).v[off + e0 + i_] = h[i_];           \
    } else {                                                                                     \
        for (uint i_ = tid; 2u * i_ < hd; i_ += 256u)                                            \
            Words(buf).v[off + (e0 >> 1) + i_] = f32_to_f16(h[2u * i_]) | (f32_to_f16(h[2u * i_ + 1u]) << 16); \
    }
