//! Plane geometry for text boxes: convex hulls, minimum-area rotated
//! rectangles, and the perspective warp that cuts a text line out of a photo.

use image::{Rgb, RgbImage};

pub type Point = [f32; 2];
/// Four corners, clockwise from the top-left as the page is read.
pub type Quad = [Point; 4];

/// Convex hull (Andrew's monotone chain), counter-clockwise in image
/// coordinates, without collinear points.
pub fn convex_hull(points: &mut [Point]) -> Vec<Point> {
    points.sort_by(|a, b| a[0].total_cmp(&b[0]).then(a[1].total_cmp(&b[1])));
    if points.len() < 3 {
        return points.to_vec();
    }
    let cross = |o: Point, a: Point, b: Point| (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]);
    let mut hull: Vec<Point> = Vec::with_capacity(points.len() + 1);
    for pass in 0..2 {
        let start = hull.len();
        let iter: Box<dyn Iterator<Item = &Point>> =
            if pass == 0 { Box::new(points.iter()) } else { Box::new(points.iter().rev()) };
        for &p in iter {
            while hull.len() >= start + 2 && cross(hull[hull.len() - 2], hull[hull.len() - 1], p) <= 0.0 {
                hull.pop();
            }
            hull.push(p);
        }
        hull.pop();
    }
    hull
}

/// A rotated rectangle.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RotatedRect {
    pub center: Point,
    /// Unit vector along the first side.
    pub axis: Point,
    /// Side lengths along `axis` and along its normal.
    pub size: [f32; 2],
}

impl RotatedRect {
    pub fn short_side(&self) -> f32 {
        self.size[0].min(self.size[1])
    }

    /// The rectangle grown by `d` on every side: what offsetting its outline
    /// outwards by `d` gives, once the rounded corners are boxed again.
    pub fn grown(&self, d: f32) -> RotatedRect {
        RotatedRect { size: [self.size[0] + 2.0 * d, self.size[1] + 2.0 * d], ..*self }
    }

    /// Corners ordered top-left, top-right, bottom-right, bottom-left.
    pub fn quad(&self) -> Quad {
        let [ux, uy] = self.axis;
        let (hw, hh) = (self.size[0] / 2.0, self.size[1] / 2.0);
        let corner = |a: f32, b: f32| [self.center[0] + a * ux - b * uy, self.center[1] + a * uy + b * ux];
        order_corners([corner(-hw, -hh), corner(hw, -hh), corner(hw, hh), corner(-hw, hh)])
    }
}

/// The smallest-area rectangle around a convex polygon, by rotating
/// calipers: one of its sides lies along an edge of the hull.
pub fn min_area_rect(hull: &[Point]) -> Option<RotatedRect> {
    if hull.is_empty() {
        return None;
    }
    if hull.len() == 1 {
        return Some(RotatedRect { center: hull[0], axis: [1.0, 0.0], size: [0.0, 0.0] });
    }
    let mut best: Option<(f32, RotatedRect)> = None;
    for i in 0..hull.len() {
        let (a, b) = (hull[i], hull[(i + 1) % hull.len()]);
        let (dx, dy) = (b[0] - a[0], b[1] - a[1]);
        let len = (dx * dx + dy * dy).sqrt();
        if len == 0.0 {
            continue;
        }
        let (ux, uy) = (dx / len, dy / len);
        let (mut min_u, mut max_u, mut min_v, mut max_v) = (f32::MAX, f32::MIN, f32::MAX, f32::MIN);
        for p in hull {
            let u = p[0] * ux + p[1] * uy;
            let v = -p[0] * uy + p[1] * ux;
            min_u = min_u.min(u);
            max_u = max_u.max(u);
            min_v = min_v.min(v);
            max_v = max_v.max(v);
        }
        let area = (max_u - min_u) * (max_v - min_v);
        if best.as_ref().is_none_or(|(a, _)| area < *a) {
            let (cu, cv) = ((min_u + max_u) / 2.0, (min_v + max_v) / 2.0);
            let center = [cu * ux - cv * uy, cu * uy + cv * ux];
            best = Some((area, RotatedRect { center, axis: [ux, uy], size: [max_u - min_u, max_v - min_v] }));
        }
    }
    best.map(|(_, r)| r)
}

/// Orders four corners as top-left, top-right, bottom-right, bottom-left:
/// the two leftmost are the left side, and of each side the upper one comes
/// first.
pub fn order_corners(mut q: Quad) -> Quad {
    q.sort_by(|a, b| a[0].total_cmp(&b[0]));
    let (tl, bl) = if q[0][1] <= q[1][1] { (q[0], q[1]) } else { (q[1], q[0]) };
    let (tr, br) = if q[2][1] <= q[3][1] { (q[2], q[3]) } else { (q[3], q[2]) };
    [tl, tr, br, bl]
}

pub fn distance(a: Point, b: Point) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)).sqrt()
}

/// Whether `p` lies inside the convex quadrilateral (either winding).
pub fn in_convex_quad(q: &Quad, p: Point) -> bool {
    let mut sign = 0.0f32;
    for i in 0..4 {
        let (a, b) = (q[i], q[(i + 1) % 4]);
        let c = (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]);
        if c != 0.0 {
            if sign != 0.0 && c.signum() != sign {
                return false;
            }
            sign = c.signum();
        }
    }
    true
}

/// The homography taking the rectangle (0,0)-(w,h) onto `quad`, as the 8
/// free coefficients of a 3x3 matrix whose last entry is 1.
fn homography(quad: &Quad, w: f64, h: f64) -> Option<[f64; 8]> {
    let src = [[0.0, 0.0], [w, 0.0], [w, h], [0.0, h]];
    let mut m = [[0.0f64; 9]; 8];
    for i in 0..4 {
        let (x, y) = (src[i][0], src[i][1]);
        let (u, v) = (f64::from(quad[i][0]), f64::from(quad[i][1]));
        m[2 * i] = [x, y, 1.0, 0.0, 0.0, 0.0, -u * x, -u * y, u];
        m[2 * i + 1] = [0.0, 0.0, 0.0, x, y, 1.0, -v * x, -v * y, v];
    }
    // Gaussian elimination with partial pivoting.
    for col in 0..8 {
        let pivot = (col..8).max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))?;
        if m[pivot][col].abs() < 1e-12 {
            return None;
        }
        m.swap(col, pivot);
        for row in 0..8 {
            if row != col {
                let f = m[row][col] / m[col][col];
                let pivot_row = m[col];
                for (x, p) in m[row][col..].iter_mut().zip(&pivot_row[col..]) {
                    *x -= f * p;
                }
            }
        }
    }
    let mut h8 = [0.0; 8];
    for i in 0..8 {
        h8[i] = m[i][8] / m[i][i];
    }
    Some(h8)
}

/// Cuts the quadrilateral `quad` out of `image` into an upright
/// `width`x`height` image (bilinear sampling, edges replicated), the way a
/// scanner app straightens a photographed page.
pub fn warp_quad(image: &RgbImage, quad: &Quad, width: u32, height: u32) -> RgbImage {
    let mut out = RgbImage::new(width.max(1), height.max(1));
    let Some(h) = homography(quad, f64::from(width), f64::from(height)) else {
        return out;
    };
    let (iw, ih) = (image.width() as f32, image.height() as f32);
    for y in 0..out.height() {
        for x in 0..out.width() {
            let (xf, yf) = (f64::from(x), f64::from(y));
            let z = h[6] * xf + h[7] * yf + 1.0;
            let u = ((h[0] * xf + h[1] * yf + h[2]) / z) as f32;
            let v = ((h[3] * xf + h[4] * yf + h[5]) / z) as f32;
            out.put_pixel(x, y, bilinear(image, u.clamp(0.0, iw - 1.0), v.clamp(0.0, ih - 1.0)));
        }
    }
    out
}

fn bilinear(image: &RgbImage, u: f32, v: f32) -> Rgb<u8> {
    let (x0, y0) = (u.floor() as u32, v.floor() as u32);
    let (x1, y1) = ((x0 + 1).min(image.width() - 1), (y0 + 1).min(image.height() - 1));
    let (fx, fy) = (u - x0 as f32, v - y0 as f32);
    let (p00, p10, p01, p11) =
        (image.get_pixel(x0, y0), image.get_pixel(x1, y0), image.get_pixel(x0, y1), image.get_pixel(x1, y1));
    let mut out = [0u8; 3];
    for c in 0..3 {
        let top = f32::from(p00[c]) * (1.0 - fx) + f32::from(p10[c]) * fx;
        let bottom = f32::from(p01[c]) * (1.0 - fx) + f32::from(p11[c]) * fx;
        out[c] = (top * (1.0 - fy) + bottom * fy).round() as u8;
    }
    Rgb(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_minimum_rectangle_of_a_rotated_rectangle_is_itself() {
        let angle = 0.3f32;
        let rect = RotatedRect { center: [50.0, 40.0], axis: [angle.cos(), angle.sin()], size: [60.0, 10.0] };
        let mut corners = rect.quad().to_vec();
        // Points inside must not change the answer.
        corners.extend([[50.0, 40.0], [52.0, 41.0]]);
        let found = min_area_rect(&convex_hull(&mut corners)).unwrap();
        let (long, short) = (found.size[0].max(found.size[1]), found.short_side());
        assert!((long - 60.0).abs() < 1e-3 && (short - 10.0).abs() < 1e-3, "{found:?}");
        assert!((found.center[0] - 50.0).abs() < 1e-3 && (found.center[1] - 40.0).abs() < 1e-3);
    }

    #[test]
    fn corners_come_clockwise_from_the_top_left() {
        let q = order_corners([[10.0, 5.0], [0.0, 6.0], [0.0, 0.0], [10.0, 0.0]]);
        assert_eq!(q, [[0.0, 0.0], [10.0, 0.0], [10.0, 5.0], [0.0, 6.0]]);
        assert!(in_convex_quad(&q, [5.0, 3.0]));
        assert!(!in_convex_quad(&q, [11.0, 3.0]));
    }

    #[test]
    fn the_hull_drops_interior_and_collinear_points() {
        let mut pts = vec![[0.0, 0.0], [2.0, 0.0], [4.0, 0.0], [4.0, 4.0], [0.0, 4.0], [2.0, 2.0]];
        assert_eq!(convex_hull(&mut pts).len(), 4);
    }

    #[test]
    fn warping_an_axis_aligned_box_is_a_crop() {
        let image = RgbImage::from_fn(20, 10, |x, y| Rgb([x as u8 * 10, y as u8 * 20, 0]));
        let crop = warp_quad(&image, &[[4.0, 2.0], [12.0, 2.0], [12.0, 8.0], [4.0, 8.0]], 8, 6);
        assert_eq!(crop.get_pixel(0, 0), image.get_pixel(4, 2));
        assert_eq!(crop.get_pixel(7, 5), image.get_pixel(11, 7));
    }
}
