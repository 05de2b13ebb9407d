//! CPython's `random` module, as far as EasyEdit's data preparation uses it: `random.seed(n)` and
//! `random.choice(seq)`. ConvSent's edit requests are drawn with it (`run_convsent_llama2.py` seeds
//! 0), so reproducing the draws is what makes kedit's ConvSent cases EasyEdit's cases.

/// MT19937, seeded and drawn exactly as CPython's `random.Random`.
pub struct PythonRandom {
    state: [u32; 624],
    index: usize,
}

impl PythonRandom {
    /// `random.seed(seed)` for a non-negative integer seed: the seed's 32-bit words, least
    /// significant first, go through MT19937's `init_by_array` (zero is the one-word key `[0]`).
    pub fn new(seed: u64) -> Self {
        let mut key = vec![seed as u32];
        if seed >> 32 != 0 {
            key.push((seed >> 32) as u32);
        }
        let mut rng = PythonRandom {
            state: [0; 624],
            index: 624,
        };
        rng.init_by_array(&key);
        rng
    }

    fn init_genrand(&mut self, s: u32) {
        self.state[0] = s;
        for i in 1..624 {
            let prev = self.state[i - 1];
            self.state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        self.index = 624;
    }

    fn init_by_array(&mut self, key: &[u32]) {
        self.init_genrand(19_650_218);
        let n = 624;
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..n.max(key.len()) {
            let prev = self.state[i - 1];
            self.state[i] = (self.state[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= n {
                self.state[0] = self.state[n - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..n - 1 {
            let prev = self.state[i - 1];
            self.state[i] = (self.state[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_566_083_941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= n {
                self.state[0] = self.state[n - 1];
                i = 1;
            }
        }
        self.state[0] = 0x8000_0000;
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        for i in 0..624 {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % 624] & LOWER);
            let mut next = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    /// `random.getrandbits(k)` for `1 <= k <= 32`.
    fn getrandbits(&mut self, k: u32) -> u32 {
        self.next_u32() >> (32 - k)
    }

    /// `random.randrange(n)` / the index `random.choice` picks from a sequence of length `n`:
    /// rejection sampling on `n.bit_length()` random bits.
    pub fn below(&mut self, n: usize) -> usize {
        assert!(
            n > 0 && n <= u32::MAX as usize,
            "cannot choose from {n} items"
        );
        let bits = usize::BITS - n.leading_zeros();
        loop {
            let r = self.getrandbits(bits) as usize;
            if r < n {
                return r;
            }
        }
    }

    /// `random.random()`: a float in [0, 1) from 53 random bits (27 of one word, 26 of the next).
    pub fn random(&mut self) -> f64 {
        let a = f64::from(self.next_u32() >> 5);
        let b = f64::from(self.next_u32() >> 6);
        (a * 67_108_864.0 + b) / 9_007_199_254_740_992.0
    }

    /// `random.shuffle(items)`: Fisher–Yates from the end.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }

    /// `random.choice(items)`.
    pub fn choice<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reference values printed by CPython 3 (`random.seed(0)`, then the calls shown).
    #[test]
    fn matches_cpython_seed_zero() {
        let mut rng = PythonRandom::new(0);
        let coins: Vec<usize> = (0..10).map(|_| rng.below(2)).collect();
        assert_eq!(coins, [1, 1, 0, 1, 1, 1, 1, 1, 1, 0]);
        assert_eq!(rng.getrandbits(32), 2_167_613_558);
    }

    #[test]
    fn matches_cpython_for_other_seeds_and_ranges() {
        // python3 -c "import random; random.seed(12345); print([random.randrange(13) for _ in range(8)])"
        let mut rng = PythonRandom::new(12345);
        let draws: Vec<usize> = (0..8).map(|_| rng.below(13)).collect();
        assert_eq!(draws, [6, 11, 0, 12, 4, 5, 3, 4]);
        // A seed wider than 32 bits uses a two-word key:
        // python3 -c "import random; random.seed(2**40+7); print([random.choice(range(1000)) for _ in range(5)])"
        let mut rng = PythonRandom::new((1 << 40) + 7);
        let draws: Vec<usize> = (0..5).map(|_| rng.below(1000)).collect();
        assert_eq!(draws, [628, 765, 834, 960, 967]);
        // python3 -c "import random; r = random.Random(1); x = list(range(10)); r.shuffle(x); print(x)"
        let mut rng = PythonRandom::new(1);
        let mut items: Vec<usize> = (0..10).collect();
        rng.shuffle(&mut items);
        assert_eq!(items, [6, 8, 9, 7, 5, 3, 0, 4, 1, 2]);
    }

    // python3 -c "import random; random.seed(0); print([random.random() for _ in range(3)])"
    #[test]
    fn random_floats_match_cpython() {
        let mut rng = PythonRandom::new(0);
        let draws: Vec<f64> = (0..3).map(|_| rng.random()).collect();
        assert_eq!(
            draws,
            [0.8444218515250481, 0.7579544029403025, 0.420571580830845]
        );
        assert_eq!(PythonRandom::new(42).random(), 0.6394267984578837);
    }
}
