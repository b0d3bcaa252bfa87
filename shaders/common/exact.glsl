// The reference's float functions (purehw_kernels::ops), operation for operation.
// Every expression is `precise` (no contraction into fused multiply-adds the reference does not
// do). Division and square root are correctly rounded: the device's own (Vulkan lets it be 2.5
// ulp off, or more for square roots) only estimates the result, which integer arithmetic checks
// and corrects.

// Round a positive significand `m` (leading one at bit 23 + extra, `extra` bits below the 24
// that are kept; `sticky` set when anything nonzero was lost below those) at biased exponent
// `e`, ties to even, and pack it with `sign`. Handles subnormal results and overflow.
float round_pack(uint sign, int e, uint m, uint extra, bool sticky) {
    if (e <= 0) {
        uint sh = uint(1 - e);
        if (sh > 26u) {
            sticky = sticky || m != 0u;
            m = 0u;
        } else {
            sticky = sticky || (m & ((1u << sh) - 1u)) != 0u;
            m >>= sh;
        }
    }
    uint half_ = 1u << (extra - 1u);
    uint low = m & ((1u << extra) - 1u);
    uint mant = m >> extra;
    if (low > half_ || (low == half_ && (sticky || (mant & 1u) != 0u))) mant += 1u;
    if (e >= 255) return uintBitsToFloat(sign | 0x7F800000u);
    // A normal's implicit bit adds one to the exponent field; a carry out of the significand
    // moves to the next exponent (or from the largest subnormal to the smallest normal).
    uint bits = e > 0 ? (uint(e - 1) << 23) + mant : mant;
    if (bits >= 0x7F800000u) bits = 0x7F800000u;
    return uintBitsToFloat(sign | bits);
}

// Significand (leading one at bit 23) and unbiased-by-127 exponent of a finite nonzero float's
// magnitude bits, subnormals normalised.
void unpack_norm(uint u, out uint m, out int e) {
    e = int(u >> 23);
    m = u & 0x7FFFFFu;
    if (e == 0) {
        int msb = findMSB(m);
        m <<= uint(23 - msb);
        e = 1 - (23 - msb);
    } else {
        m |= 0x800000u;
    }
}

// a / b, correctly rounded (IEEE 754 binary32, round to nearest even), in 32-bit integers.
float div_rn_int(float a, float b) {
    uint ua = floatBitsToUint(a), ub = floatBitsToUint(b);
    uint sign = (ua ^ ub) & 0x80000000u;
    ua &= 0x7FFFFFFFu;
    ub &= 0x7FFFFFFFu;
    if (ua > 0x7F800000u || ub > 0x7F800000u) return uintBitsToFloat(0x7FC00000u);
    if (ua == 0x7F800000u) return uintBitsToFloat(ub == 0x7F800000u ? 0x7FC00000u : (sign | 0x7F800000u));
    if (ub == 0x7F800000u) return uintBitsToFloat(sign);
    if (ub == 0u) return uintBitsToFloat(ua == 0u ? 0x7FC00000u : (sign | 0x7F800000u));
    if (ua == 0u) return uintBitsToFloat(sign);
    uint ma, mb;
    int ea, eb;
    unpack_norm(ua, ma, ea);
    unpack_norm(ub, mb, eb);
    int e = ea - eb + 127;
    if (ma < mb) {
        ma <<= 1;
        e -= 1;
    }
    // ma / mb in [1, 2): q = floor(ma·2^25 / mb), 26 quotient bits (24 kept + 2), and whether
    // a remainder is left (the sticky bit). The device's own division gives q within a few
    // units; the 64-bit remainder ma·2^25 − q·mb, exact in integers, corrects it.
    uint q = uint(float(ma) / float(mb) * 33554432.0);
    uint phi, plo, borrow;
    umulExtended(q, mb, phi, plo);
    uint rlo = usubBorrow(ma << 25, plo, borrow);
    uint rhi = (ma >> 7) - phi - borrow;
    for (int i = 0; i < 64 && int(rhi) < 0; i++) {
        uint carry;
        rlo = uaddCarry(rlo, mb, carry);
        rhi += carry;
        q -= 1u;
    }
    for (int i = 0; i < 64 && (rhi != 0u || rlo >= mb); i++) {
        rlo = usubBorrow(rlo, mb, borrow);
        rhi -= borrow;
        q += 1u;
    }
    return round_pack(sign, e, q, 2u, rlo != 0u);
}

// sqrt(x), correctly rounded; NaN for x < 0; in 32-bit integers.
float sqrt_rn_int(float x) {
    uint u = floatBitsToUint(x);
    if (u == 0u || u == 0x80000000u) return x;
    if ((u & 0x80000000u) != 0u || u > 0x7F800000u) return uintBitsToFloat(0x7FC00000u);
    if (u == 0x7F800000u) return x;
    uint m;
    int e;
    unpack_norm(u, m, e);
    int ue = e - 127;
    if ((ue & 1) != 0) {
        m <<= 1;
        ue -= 1;
    }
    // root = floor(sqrt(m·2^27)) (m < 2^25, even when shifted): 26 bits, the leading one at bit
    // 25, and whether a remainder is left. The device's square root gives it within a few units;
    // the 64-bit remainder m·2^27 − root², exact in integers, corrects it.
    uint root = uint(sqrt(float(m) * 134217728.0));
    uint phi, plo, borrow;
    umulExtended(root, root, phi, plo);
    uint rlo = usubBorrow(m << 27, plo, borrow);
    uint rhi = (m >> 5) - phi - borrow;
    // Below: rem += 2·root − 1 as root steps down; above: rem −= 2·root + 1 as it steps up.
    for (int i = 0; i < 64 && int(rhi) < 0; i++) {
        uint carry;
        rlo = uaddCarry(rlo, 2u * root - 1u, carry);
        rhi += carry;
        root -= 1u;
    }
    for (int i = 0; i < 64 && (rhi != 0u || rlo >= 2u * root + 1u); i++) {
        rlo = usubBorrow(rlo, 2u * root + 1u, borrow);
        rhi -= borrow;
        root += 1u;
    }
    return round_pack(0u, ue / 2 + 127, root, 2u, rlo != 0u);
}

#ifdef EXACT_F64
// The same results settled in f64, where the device has it (a `.x64` variant). The device's f64
// quotient or root, rounded to f32, is only an estimate; the candidate's neighbouring midpoints
// then decide it exactly: a midpoint has at most 25 significant bits, so its product with a
// divisor (24 bits) or itself is exact in f64, as is the difference with the dividend or
// radicand (both are that close). No quotient or root of floats lies on a midpoint, so strict
// comparisons settle every case. Anything unusual (zero, subnormal, infinite or NaN operands,
// a result near the ends of the range, an estimate off by more than 4 ulp) takes the integer path.
float div_rn(float a, float b) {
    uint ua = floatBitsToUint(a), ub = floatBitsToUint(b);
    uint ma = ua & 0x7FFFFFFFu, mb = ub & 0x7FFFFFFFu;
    if ((ma >> 23) - 1u < 254u && (mb >> 23) - 1u < 254u) {
        double A = double(uintBitsToFloat(ma)), B = double(uintBitsToFloat(mb));
        uint c = floatBitsToUint(float(A / B));
        if ((c >> 23) - 2u < 252u) {
            for (int i = 0; i < 4; i++) {
                precise double C = double(uintBitsToFloat(c));
                precise double hi = (C + double(uintBitsToFloat(c + 1u))) * 0.5;
                precise double lo = (C + double(uintBitsToFloat(c - 1u))) * 0.5;
                precise double rh = A - hi * B;
                precise double rl = A - lo * B;
                if (rh > 0.0) c += 1u;
                else if (rl < 0.0) c -= 1u;
                else return uintBitsToFloat(c | ((ua ^ ub) & 0x80000000u));
            }
        }
    }
    return div_rn_int(a, b);
}

float sqrt_rn(float x) {
    uint u = floatBitsToUint(x);
    if ((u >> 23) - 1u < 254u) {
        double X = double(x);
        uint s = floatBitsToUint(float(sqrt(X)));
        for (int i = 0; i < 4; i++) {
            precise double S = double(uintBitsToFloat(s));
            precise double hi = (S + double(uintBitsToFloat(s + 1u))) * 0.5;
            precise double lo = (S + double(uintBitsToFloat(s - 1u))) * 0.5;
            precise double h2 = hi * hi;
            precise double l2 = lo * lo;
            if (h2 < X) s += 1u;
            else if (l2 > X) s -= 1u;
            else return uintBitsToFloat(s);
        }
    }
    return sqrt_rn_int(x);
}
#else
float div_rn(float a, float b) {
    return div_rn_int(a, b);
}

float sqrt_rn(float x) {
    return sqrt_rn_int(x);
}
#endif

// purehw_kernels::ops::exp: Cephes expf as a fixed sequence of f32 operations.
float exp_ref(float x0) {
    const float LO = uintBitsToFloat(0xC2AE999Au), HI = uintBitsToFloat(0x42B0999Au); // -87.3, 88.3
    precise float x = x0 > LO ? x0 : LO;         // max(x, EXP_LO): NaN becomes EXP_LO
    x = x < HI ? x : HI;                         // min(x, EXP_HI)
    precise float t = x * uintBitsToFloat(0x3FB8AA3Bu);   // LOG2_E
    precise float n = (t + 12582912.0) - 12582912.0;
    precise float r = (x - n * uintBitsToFloat(0x3F318000u)) - n * uintBitsToFloat(0xB95E8083u);
    precise float p = uintBitsToFloat(0x39506967u);
    p = p * r + uintBitsToFloat(0x3AB743CEu);
    p = p * r + uintBitsToFloat(0x3C088908u);
    p = p * r + uintBitsToFloat(0x3D2AA9C1u);
    p = p * r + uintBitsToFloat(0x3E2AAAAAu);
    p = p * r + 0.5;
    precise float y = (p * (r * r) + r) + 1.0;
    precise float res = y * uintBitsToFloat(uint(int(n) + 127) << 23);
    return res;
}

// purehw_kernels::ops::tanh.
float tanh_ref(float x) {
    precise float a = abs(x);
    if (a < 0.0625) {
        precise float x2 = x * x;
        precise float res = x + x * ((uintBitsToFloat(0x3E088889u) * x2 + uintBitsToFloat(0xBEAAAAABu)) * x2);
        return res;
    }
    precise float e = exp_ref(-2.0 * a);
    precise float q = div_rn(1.0 - e, 1.0 + e);
    return (floatBitsToUint(x) & 0x80000000u) != 0u ? -q : q;
}

// purehw_kernels::ops::gelu_tanh.
float gelu_ref(float x) {
    precise float x3 = x * x * x;
    precise float inner = uintBitsToFloat(0x3F4C422Au) * (x + uintBitsToFloat(0x3D372713u) * x3);
    precise float res = 0.5 * x * (1.0 + tanh_ref(inner));
    return res;
}

// purehw_kernels::ops::silu.
float silu_ref(float x) {
    precise float d = 1.0 + exp_ref(-x);
    return div_rn(x, d);
}

// purehw_kernels::ops::softcap.
float softcap_ref(float x, float cap) {
    precise float res = cap * tanh_ref(div_rn(x, cap));
    return res;
}

// purehw_kernels::quant::reduce_lanes.
float reduce_lanes(float l0, float l1, float l2, float l3, float l4, float l5, float l6, float l7) {
    precise float res = ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7));
    return res;
}

// purehw_kernels::ops::argmax_key: NaN ranks as -inf, +inf as FLT_MAX.
float argmax_key(float x) {
    if (isnan(x)) return uintBitsToFloat(0xFF800000u);
    return min(x, uintBitsToFloat(0x7F7FFFFFu));
}
