//! MD5 (RFC 1321), the digest that names objects.
//!
//! Every byte a client downloads is hashed once, on its hash thread, while the next bytes
//! arrive; on a fast path that hash is what the download waits for. MD5 is one long chain of
//! dependent steps, so its speed is the length of that chain. Here each step adds the message
//! word and the round constant to the register of four steps back before the step's function
//! is ready, which leaves the function, one addition, the rotation and one more addition on the
//! chain (the order hand-written assembly uses). Written plainly, the compiler moves the
//! constant's addition after the function's, one more operation on the chain, so the constants
//! are read through an opaque reference. `cargo bench --bench transfer -- md5` on the
//! reference machine: 790 MiB/s, against 580 MiB/s for the `md-5` crate's portable code (which
//! udpferry used before, and which the tests compare this one with) and about 660 MiB/s for
//! coreutils' `md5sum`. No unsafe code, no allocation.

/// The sines of RFC 1321 section 3.4, one per step.
const K: [u32; 64] = [
    0xd76a_a478,
    0xe8c7_b756,
    0x2420_70db,
    0xc1bd_ceee,
    0xf57c_0faf,
    0x4787_c62a,
    0xa830_4613,
    0xfd46_9501,
    0x6980_98d8,
    0x8b44_f7af,
    0xffff_5bb1,
    0x895c_d7be,
    0x6b90_1122,
    0xfd98_7193,
    0xa679_438e,
    0x49b4_0821,
    0xf61e_2562,
    0xc040_b340,
    0x265e_5a51,
    0xe9b6_c7aa,
    0xd62f_105d,
    0x0244_1453,
    0xd8a1_e681,
    0xe7d3_fbc8,
    0x21e1_cde6,
    0xc337_07d6,
    0xf4d5_0d87,
    0x455a_14ed,
    0xa9e3_e905,
    0xfcef_a3f8,
    0x676f_02d9,
    0x8d2a_4c8a,
    0xfffa_3942,
    0x8771_f681,
    0x6d9d_6122,
    0xfde5_380c,
    0xa4be_ea44,
    0x4bde_cfa9,
    0xf6bb_4b60,
    0xbebf_bc70,
    0x289b_7ec6,
    0xeaa1_27fa,
    0xd4ef_3085,
    0x0488_1d05,
    0xd9d4_d039,
    0xe6db_99e5,
    0x1fa2_7cf8,
    0xc4ac_5665,
    0xf429_2244,
    0x432a_ff97,
    0xab94_23a7,
    0xfc93_a039,
    0x655b_59c3,
    0x8f0c_cc92,
    0xffef_f47d,
    0x8584_5dd1,
    0x6fa8_7e4f,
    0xfe2c_e6e0,
    0xa301_4314,
    0x4e08_11a1,
    0xf753_7e82,
    0xbd3a_f235,
    0x2ad7_d2bb,
    0xeb86_d391,
];

const INITIAL: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];

/// A streaming MD5: [`update`](Self::update) with the bytes in order, then
/// [`finalize`](Self::finalize). Needs no allocation.
#[derive(Clone)]
pub struct Md5 {
    state: [u32; 4],
    /// The bytes of an incomplete block.
    buf: [u8; 64],
    buf_len: usize,
    /// Bytes hashed so far (the padding records it modulo 2^64 bits, as RFC 1321 does).
    len: u64,
}

impl std::fmt::Debug for Md5 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Md5").field("len", &self.len).finish()
    }
}

impl Default for Md5 {
    fn default() -> Self {
        Md5::new()
    }
}

impl Md5 {
    /// A hasher that has seen no bytes.
    pub fn new() -> Self {
        Md5 {
            state: INITIAL,
            buf: [0; 64],
            buf_len: 0,
            len: 0,
        }
    }

    /// The digest of `bytes`.
    pub fn digest(bytes: &[u8]) -> [u8; 16] {
        let mut h = Md5::new();
        h.update(bytes);
        h.finalize()
    }

    /// Adds the next bytes.
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.len = self.len.wrapping_add(bytes.len() as u64);
        if self.buf_len > 0 {
            let take = (64 - self.buf_len).min(bytes.len());
            let (head, rest) = bytes.split_at(take);
            self.buf[self.buf_len..self.buf_len + take].copy_from_slice(head);
            self.buf_len += take;
            bytes = rest;
            if self.buf_len < 64 {
                return;
            }
            let block = self.buf;
            compress(&mut self.state, &block);
            self.buf_len = 0;
        }
        let mut blocks = bytes.chunks_exact(64);
        for block in &mut blocks {
            if let Ok(block) = <&[u8; 64]>::try_from(block) {
                compress(&mut self.state, block);
            }
        }
        let rest = blocks.remainder();
        self.buf[..rest.len()].copy_from_slice(rest);
        self.buf_len = rest.len();
    }

    /// The digest of everything added.
    pub fn finalize(mut self) -> [u8; 16] {
        let bits = self.len.wrapping_mul(8);
        // 0x80, zeros up to 56 bytes into a block, then the length in bits.
        let mut pad = [0u8; 64];
        pad[0] = 0x80;
        let pad_len = if self.buf_len < 56 {
            56 - self.buf_len
        } else {
            120 - self.buf_len
        };
        self.update(&pad[..pad_len]);
        self.update(&bits.to_le_bytes());
        let mut out = [0u8; 16];
        for (o, s) in out.chunks_exact_mut(4).zip(self.state) {
            o.copy_from_slice(&s.to_le_bytes());
        }
        out
    }
}

// One step each for the four rounds: `a` becomes `b + ((a + mk + fn(b, c, d)) <<< s)`, with
// `mk` the message word plus the step's constant, added before `fn` is known.

#[inline(always)]
fn f(a: u32, b: u32, c: u32, d: u32, mk: u32, s: u32) -> u32 {
    let t = a.wrapping_add(mk);
    b.wrapping_add(t.wrapping_add(d ^ (b & (c ^ d))).rotate_left(s))
}

#[inline(always)]
fn g(a: u32, b: u32, c: u32, d: u32, mk: u32, s: u32) -> u32 {
    // (b & d) | (c & !d): the two halves share no bit, so they can be added one at a time, the
    // one without `b` first.
    let t = a.wrapping_add(mk).wrapping_add(c & !d);
    b.wrapping_add(t.wrapping_add(b & d).rotate_left(s))
}

#[inline(always)]
fn h(a: u32, b: u32, c: u32, d: u32, mk: u32, s: u32) -> u32 {
    let t = a.wrapping_add(mk);
    b.wrapping_add(t.wrapping_add(b ^ c ^ d).rotate_left(s))
}

#[inline(always)]
fn i(a: u32, b: u32, c: u32, d: u32, mk: u32, s: u32) -> u32 {
    let t = a.wrapping_add(mk);
    b.wrapping_add(t.wrapping_add(c ^ (b | !d)).rotate_left(s))
}

/// The 64 steps of RFC 1321 section 3.4 on one block.
fn compress(state: &mut [u32; 4], block: &[u8; 64]) {
    let mut m = [0u32; 16];
    for (w, b) in m.iter_mut().zip(block.chunks_exact(4)) {
        *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    // Seen as constants, the round constants would be added after the step's function (the
    // compiler puts constants last in a sum); read through a reference it cannot see through,
    // they are added with the message word, off the chain.
    let k: &[u32; 64] = std::hint::black_box(&K);
    let [mut a, mut b, mut c, mut d] = *state;
    macro_rules! steps {
        ($op:ident, $base:expr, [$w0:expr, $w1:expr, $w2:expr, $w3:expr], [$s0:expr, $s1:expr, $s2:expr, $s3:expr]) => {
            a = $op(a, b, c, d, m[$w0].wrapping_add(k[$base]), $s0);
            d = $op(d, a, b, c, m[$w1].wrapping_add(k[$base + 1]), $s1);
            c = $op(c, d, a, b, m[$w2].wrapping_add(k[$base + 2]), $s2);
            b = $op(b, c, d, a, m[$w3].wrapping_add(k[$base + 3]), $s3);
        };
    }
    steps!(f, 0, [0, 1, 2, 3], [7, 12, 17, 22]);
    steps!(f, 4, [4, 5, 6, 7], [7, 12, 17, 22]);
    steps!(f, 8, [8, 9, 10, 11], [7, 12, 17, 22]);
    steps!(f, 12, [12, 13, 14, 15], [7, 12, 17, 22]);
    steps!(g, 16, [1, 6, 11, 0], [5, 9, 14, 20]);
    steps!(g, 20, [5, 10, 15, 4], [5, 9, 14, 20]);
    steps!(g, 24, [9, 14, 3, 8], [5, 9, 14, 20]);
    steps!(g, 28, [13, 2, 7, 12], [5, 9, 14, 20]);
    steps!(h, 32, [5, 8, 11, 14], [4, 11, 16, 23]);
    steps!(h, 36, [1, 4, 7, 10], [4, 11, 16, 23]);
    steps!(h, 40, [13, 0, 3, 6], [4, 11, 16, 23]);
    steps!(h, 44, [9, 12, 15, 2], [4, 11, 16, 23]);
    steps!(i, 48, [0, 7, 14, 5], [6, 10, 15, 21]);
    steps!(i, 52, [12, 3, 10, 1], [6, 10, 15, 21]);
    steps!(i, 56, [8, 15, 6, 13], [6, 10, 15, 21]);
    steps!(i, 60, [4, 11, 2, 9], [6, 10, 15, 21]);
    state[0] = state[0].wrapping_add(a);
    state[1] = state[1].wrapping_add(b);
    state[2] = state[2].wrapping_add(c);
    state[3] = state[3].wrapping_add(d);
}

#[cfg(test)]
mod tests {
    use super::Md5;
    use proptest::prelude::*;

    fn hex(d: [u8; 16]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// RFC 1321 appendix A.5.
    #[test]
    fn rfc_1321_test_suite() {
        for (input, expected) in [
            ("", "d41d8cd98f00b204e9800998ecf8427e"),
            ("a", "0cc175b9c0f1b6a831c399e269772661"),
            ("abc", "900150983cd24fb0d6963f7d28e17f72"),
            ("message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
            (
                "abcdefghijklmnopqrstuvwxyz",
                "c3fcd3d76192e4007dfb496cca67e13b",
            ),
            (
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
                "d174ab98d277d9f5a5611c2c9f419d9f",
            ),
            (
                "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
                "57edf4a22be3c955ac49da2e2107b67a",
            ),
        ] {
            assert_eq!(hex(Md5::digest(input.as_bytes())), expected, "{input:?}");
        }
    }

    /// Every length around the block and padding boundaries, in one piece and byte by byte.
    #[test]
    fn same_as_md_5_at_every_boundary() {
        use ::md5::Digest;
        let data: Vec<u8> = (0..300u32).map(|i| (i * 131 + 7) as u8).collect();
        for len in 0..data.len() {
            let expected: [u8; 16] = ::md5::Md5::digest(&data[..len]).into();
            assert_eq!(Md5::digest(&data[..len]), expected, "len {len}");
            let mut h = Md5::new();
            for b in &data[..len] {
                h.update(std::slice::from_ref(b));
            }
            assert_eq!(h.finalize(), expected, "len {len}, byte by byte");
        }
    }

    proptest! {
        /// Any bytes, fed in any pieces, give `md-5`'s digest.
        #[test]
        fn same_as_md_5(data in proptest::collection::vec(any::<u8>(), 0..5000), cuts in proptest::collection::vec(any::<usize>(), 0..8)) {
            use ::md5::Digest;
            let expected: [u8; 16] = ::md5::Md5::digest(&data).into();
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
            points.sort_unstable();
            let mut h = Md5::new();
            let mut from = 0;
            for p in points {
                h.update(&data[from..p]);
                from = p;
            }
            h.update(&data[from..]);
            prop_assert_eq!(h.finalize(), expected);
        }
    }
}
