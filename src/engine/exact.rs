//! Exact decayed sums that do not depend on the order events arrive in.
//!
//! A decayed sum `Σ pᵢ·2^(−(t−tᵢ)/h)` is commutative in real arithmetic but
//! not in floating point, so it is kept in integers instead. Time is cut into
//! *cells* of [`CELL_HALF_LIVES`] half-lives, fixed on the Unix epoch. Each
//! contribution is converted, from its own event time alone, into an integer
//! in units of `2^-FRACTION_BITS` points valued at the start of its cell, so
//! adding, subtracting and regrouping contributions is exact integer
//! arithmetic (wrapping, hence associative even in the absurd case of
//! overflow). A sum keeps the newest cell it has seen and the one before;
//! contributions older than that (at least 16 half-lives old, worth less than
//! 2⁻¹⁶ of their points) are forgotten. Which cells are kept depends only on
//! the newest event time, so the kept integers are a function of the *set* of
//! contributions, whatever their order.
//!
//! Floating point appears only when a sum is read at an instant, through the
//! pure-Rust `libm` (identical bits on every platform).

use crate::event::Millis;

/// Half-lives per cell.
pub const CELL_HALF_LIVES: i64 = 16;

/// Fractional bits of a contribution at the start of its cell.
pub const FRACTION_BITS: i32 = 24;

/// Largest accepted absolute points of one rule (checked when rules compile),
/// so that one contribution stays far inside an `i64`.
pub const MAX_POINTS: f64 = 1_000_000.0;

/// One contribution, ready to add to a [`Cells`] sum of the same half-life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Term {
    /// The cell the event time falls in.
    pub cell: i64,
    /// Integer value at the start of the cell, in `2^-FRACTION_BITS` points.
    pub value: i64,
}

impl Term {
    /// The contribution of `points` at event time `at` to a sum decaying with
    /// `half_life_ms`. Depends on nothing else.
    pub fn new(points: f64, at: Millis, half_life_ms: i64) -> Term {
        let h = half_life_ms.max(1);
        let q = at.div_euclid(h);
        let r = at.rem_euclid(h);
        let cell = q.div_euclid(CELL_HALF_LIVES);
        let k = q.rem_euclid(CELL_HALF_LIVES) as i32;
        // points · 2^(r/h) lies in [points, 2·points); scaling by a power of
        // two is exact, so the only rounding is the final one, fixed per event.
        let mantissa = points * libm::exp2(r as f64 / h as f64);
        let value = libm::round(libm::ldexp(mantissa, FRACTION_BITS + k)) as i64;
        Term { cell, value }
    }

    /// The same contribution with the opposite sign.
    pub fn negated(self) -> Term {
        Term {
            cell: self.cell,
            value: self.value.wrapping_neg(),
        }
    }
}

/// A decayed sum over the newest cell and the one before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cells {
    /// Sum of the contributions in the newest cell.
    pub current: i64,
    /// Sum of the contributions in the cell before.
    pub previous: i64,
}

impl Cells {
    /// Whether nothing is held.
    pub fn is_zero(&self) -> bool {
        self.current == 0 && self.previous == 0
    }

    /// Adds `term` to a sum whose newest cell is `window`. Returns false (and
    /// adds nothing) if the term is older than the kept cells. The caller moves
    /// `window` forward first with [`Cells::shift`] when a term is newer.
    pub fn add(&mut self, window: i64, term: Term) -> bool {
        if term.cell == window {
            self.current = self.current.wrapping_add(term.value);
            true
        } else if term.cell == window - 1 {
            self.previous = self.previous.wrapping_add(term.value);
            true
        } else {
            false
        }
    }

    /// Moves the sum from newest cell `from` to the later cell `to`,
    /// forgetting what falls out of the two kept cells.
    pub fn shift(&mut self, from: i64, to: i64) {
        match to - from {
            d if d <= 0 => {}
            1 => {
                self.previous = self.current;
                self.current = 0;
            }
            _ => *self = Cells::default(),
        }
    }

    /// Wrapping sum of two sums over the same window.
    pub fn plus(self, other: Cells) -> Cells {
        Cells {
            current: self.current.wrapping_add(other.current),
            previous: self.previous.wrapping_add(other.previous),
        }
    }

    /// The sum's value at instant `t`, for newest cell `window`.
    pub fn value_at(&self, window: i64, half_life_ms: i64, t: Millis) -> f64 {
        if self.is_zero() {
            return 0.0;
        }
        let h = half_life_ms.max(1);
        let start = window.saturating_mul(CELL_HALF_LIVES).saturating_mul(h);
        let level =
            self.current as f64 + libm::ldexp(self.previous as f64, -(CELL_HALF_LIVES as i32));
        let elapsed = (t.saturating_sub(start)) as f64 / h as f64;
        libm::ldexp(level * libm::exp2(-elapsed), -FRACTION_BITS)
    }

    /// The instantaneous decay rate (d value / dt, per ms) at `t`.
    pub fn slope_at(&self, window: i64, half_life_ms: i64, t: f64) -> (f64, f64) {
        if self.is_zero() {
            return (0.0, 0.0);
        }
        let h = half_life_ms.max(1) as f64;
        let start = (window.saturating_mul(CELL_HALF_LIVES) as f64) * h;
        let level =
            self.current as f64 + libm::ldexp(self.previous as f64, -(CELL_HALF_LIVES as i32));
        let v = libm::ldexp(level * libm::exp2(-((t - start) / h)), -FRACTION_BITS);
        (v, -v * std::f64::consts::LN_2 / h)
    }
}

/// The cell an instant falls in, for a half-life.
pub fn cell_of(at: Millis, half_life_ms: i64) -> i64 {
    at.div_euclid(half_life_ms.max(1))
        .div_euclid(CELL_HALF_LIVES)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const H: i64 = 7 * 24 * 3_600_000;
    const T0: Millis = 1_764_000_000_000;

    fn sum(terms: &[(f64, Millis)]) -> (i64, Cells) {
        let mut window = i64::MIN;
        let mut cells = Cells::default();
        for (p, t) in terms {
            let term = Term::new(*p, *t, H);
            if term.cell > window {
                if window != i64::MIN {
                    cells.shift(window, term.cell);
                }
                window = term.cell;
            }
            cells.add(window, term);
        }
        (window, cells)
    }

    #[test]
    fn values_match_the_formula() {
        let (w, c) = sum(&[(10.0, T0), (5.0, T0 + H)]);
        let expect = 10.0 * 0.25 + 5.0 * 0.5;
        let got = c.value_at(w, H, T0 + 2 * H);
        assert!((got - expect).abs() < 1e-6, "{got} vs {expect}");
    }

    #[test]
    fn forgets_only_what_is_two_cells_old() {
        let span = CELL_HALF_LIVES * H;
        let (w, c) = sum(&[(10.0, T0), (1.0, T0 + 3 * span)]);
        assert_eq!(w, cell_of(T0 + 3 * span, H));
        let v = c.value_at(w, H, T0 + 3 * span);
        assert!((v - 1.0).abs() < 1e-6, "{v}");
    }

    proptest! {
        /// The kept integers are the same whatever the order of the terms.
        #[test]
        fn any_order_gives_the_same_bits(
            terms in proptest::collection::vec((-50.0f64..50.0, 0i64..(400 * H)), 1..40),
            seed in any::<u64>(),
        ) {
            let terms: Vec<(f64, Millis)> = terms.into_iter().map(|(p, t)| (p, T0 + t)).collect();
            let mut shuffled = terms.clone();
            let mut x = seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            prop_assert_eq!(sum(&terms), sum(&shuffled));
        }

        /// Adding then subtracting a term restores the sum exactly.
        #[test]
        fn subtraction_is_exact(p in -50.0f64..50.0, t in 0i64..H, base in 0.0f64..100.0) {
            let (w, c) = sum(&[(base, T0)]);
            let term = Term::new(p, T0 + t, H);
            let mut d = c;
            if d.add(w, term) {
                d.add(w, term.negated());
            }
            prop_assert_eq!(c, d);
        }
    }
}
