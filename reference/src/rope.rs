//! Rotary position embedding, rotate-half form (Llama / MiniMind).

use ndarray::{s, Array2, ArrayView2};

/// cos/sin tables: [T, hd], row t = `[cos(t*f), cos(t*f)]` with `f_i = theta^(-2i/hd)`, i < hd/2.
pub fn tables(t: usize, head_dim: usize, theta: f64) -> (Array2<f64>, Array2<f64>) {
    let positions: Vec<usize> = (0..t).collect();
    tables_at(&positions, head_dim, theta)
}

/// cos/sin tables for arbitrary positions: [N, hd], row n built for position `positions[n]`
/// exactly as [`tables`] builds row `positions[n]` (the same f64 operations, so equal bits).
pub fn tables_at(positions: &[usize], head_dim: usize, theta: f64) -> (Array2<f64>, Array2<f64>) {
    let half = head_dim / 2;
    let mut cos = Array2::zeros((positions.len(), head_dim));
    let mut sin = Array2::zeros((positions.len(), head_dim));
    for (row, &pos) in positions.iter().enumerate() {
        for i in 0..half {
            let f = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            let a = pos as f64 * f;
            for j in [i, i + half] {
                cos[[row, j]] = a.cos();
                sin[[row, j]] = a.sin();
            }
        }
    }
    (cos, sin)
}

/// `rotate_half(x) = [-x2, x1]` on the last axis. x: [T, hd] -> [T, hd].
fn rotate_half(x: ArrayView2<f64>) -> Array2<f64> {
    let h = x.ncols() / 2;
    let mut out = Array2::zeros(x.raw_dim());
    out.slice_mut(s![.., ..h])
        .assign(&x.slice(s![.., h..]).mapv(|v| -v));
    out.slice_mut(s![.., h..]).assign(&x.slice(s![.., ..h]));
    out
}

/// Transpose of `rotate_half`: `[z2, -z1]`.
fn rotate_half_t(z: ArrayView2<f64>) -> Array2<f64> {
    let h = z.ncols() / 2;
    let mut out = Array2::zeros(z.raw_dim());
    out.slice_mut(s![.., ..h]).assign(&z.slice(s![.., h..]));
    out.slice_mut(s![.., h..])
        .assign(&z.slice(s![.., ..h]).mapv(|v| -v));
    out
}

/// x: [T, hd] (one head of one sequence) -> `x*cos + rotate_half(x)*sin`. Linear, no cache.
pub fn forward(x: ArrayView2<f64>, cos: ArrayView2<f64>, sin: ArrayView2<f64>) -> Array2<f64> {
    &x * &cos + &rotate_half(x) * &sin
}

/// dy: [T, hd] -> dx = `dy*cos + rotate_half^T(dy*sin)`.
pub fn backward(dy: ArrayView2<f64>, cos: ArrayView2<f64>, sin: ArrayView2<f64>) -> Array2<f64> {
    &dy * &cos + &rotate_half_t((&dy * &sin).view())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_at_arbitrary_positions_equal_the_rows_of_the_contiguous_table() {
        let (cos, sin) = tables(40, 96, 1e6);
        let (c2, s2) = tables_at(&[39, 0, 7, 7], 96, 1e6);
        for (r, &p) in [39usize, 0, 7, 7].iter().enumerate() {
            assert_eq!(c2.row(r), cos.row(p));
            assert_eq!(s2.row(r), sin.row(p));
        }
    }
}
