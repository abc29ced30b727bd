//! Reading order: which line comes after which, and what separates them.
//!
//! The page is first turned by the median angle of its lines, so a photo
//! taken a few degrees off still has horizontal rows. Then a recursive XY
//! cut: a region is split into columns where a vertical gutter runs through
//! it (both sides wide blocks of several lines, so that a receipt's column of
//! prices is not mistaken for a second column of text), and otherwise into
//! two at its widest horizontal gap. What cannot be split is a row: its lines
//! are read left to right and joined with spaces. A vertical gap well above
//! the usual line spacing, or the start of a new column, is a paragraph break.
//!
//! The XY cut takes the widest gap first, so a title separated from the
//! columns below it by more space than the lines within them is read first
//! and the columns after it, column by column.

use super::geometry::Quad;

/// How a line joins the text before it; the order is their strength.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Join {
    Space,
    Line,
    Paragraph,
}

impl Join {
    pub fn as_str(self) -> &'static str {
        match self {
            Join::Space => " ",
            Join::Line => "\n",
            Join::Paragraph => "\n\n",
        }
    }
}

/// A paragraph break is a row pitch (distance between row centers; centers,
/// not edges, because a row without ascenders or descenders has a shorter
/// box) this many times the page's usual pitch...
const PARAGRAPH_PITCH: f32 = 1.5;
/// ...and at least this many line heights...
const PARAGRAPH_MIN_HEIGHTS: f32 = 1.3;
/// ...or, whatever the usual pitch, this many line heights (a page of
/// one-line paragraphs has no usual single-spaced pitch to compare with).
const PARAGRAPH_HEIGHTS: f32 = 2.2;
/// A gutter must be at least this many line heights wide to split columns.
const MIN_GUTTER: f32 = 0.8;
/// Each column must be at least this many times wider than the gutter.
const MIN_COLUMN_TO_GUTTER: f32 = 2.0;

#[derive(Clone, Copy, Debug)]
struct Bounds {
    x0: f32,
    y0: f32,
    x1: f32,
    y1: f32,
}

impl Bounds {
    fn center_y(&self) -> f32 {
        (self.y0 + self.y1) / 2.0
    }
}

struct Row {
    items: Vec<usize>,
    starts_column: bool,
}

/// Line indices in reading order, each with how it joins the one before (the
/// first line's join means nothing).
pub fn reading_order(quads: &[Quad]) -> Vec<(usize, Join)> {
    if quads.is_empty() {
        return Vec::new();
    }
    let bounds = deskewed_bounds(quads);
    let mut heights: Vec<f32> = bounds.iter().map(|b| b.y1 - b.y0).collect();
    heights.sort_by(f32::total_cmp);
    let line_height = heights[heights.len() / 2].max(1.0);
    let mut rows = Vec::new();
    xy_cut((0..quads.len()).collect(), &bounds, line_height, false, &mut rows);

    let mut order = Vec::with_capacity(quads.len());
    let centers: Vec<f32> = rows.iter().map(|r| center_of(&r.items, &bounds)).collect();
    let mut pitches: Vec<f32> =
        (1..rows.len()).filter(|&k| !rows[k].starts_column).map(|k| centers[k] - centers[k - 1]).collect();
    pitches.sort_by(f32::total_cmp);
    let usual_pitch = pitches.get(pitches.len() / 2).copied().unwrap_or(f32::MAX);
    for (k, row) in rows.iter().enumerate() {
        let pitch = if k == 0 { 0.0 } else { centers[k] - centers[k - 1] };
        let paragraph = row.starts_column
            || pitch > PARAGRAPH_HEIGHTS * line_height
            || (pitch > PARAGRAPH_PITCH * usual_pitch && pitch > PARAGRAPH_MIN_HEIGHTS * line_height);
        let join = if paragraph { Join::Paragraph } else { Join::Line };
        for (n, &i) in row.items.iter().enumerate() {
            order.push((i, if n == 0 { join } else { Join::Space }));
        }
    }
    order
}

/// Axis-aligned bounds of every box after turning the page by the median
/// line angle.
fn deskewed_bounds(quads: &[Quad]) -> Vec<Bounds> {
    let mut angles: Vec<f32> = quads
        .iter()
        .filter(|q| super::geometry::distance(q[0], q[1]) > super::geometry::distance(q[0], q[3]))
        .map(|q| (q[1][1] - q[0][1]).atan2(q[1][0] - q[0][0]))
        .collect();
    angles.sort_by(f32::total_cmp);
    let angle = angles.get(angles.len() / 2).copied().unwrap_or(0.0);
    let (sin, cos) = (-angle).sin_cos();
    quads
        .iter()
        .map(|q| {
            let pts = q.map(|[x, y]| [x * cos - y * sin, x * sin + y * cos]);
            Bounds {
                x0: pts.iter().map(|p| p[0]).fold(f32::MAX, f32::min),
                y0: pts.iter().map(|p| p[1]).fold(f32::MAX, f32::min),
                x1: pts.iter().map(|p| p[0]).fold(f32::MIN, f32::max),
                y1: pts.iter().map(|p| p[1]).fold(f32::MIN, f32::max),
            }
        })
        .collect()
}

fn xy_cut(items: Vec<usize>, bounds: &[Bounds], line_height: f32, starts_column: bool, rows: &mut Vec<Row>) {
    if let Some((left, right)) = column_split(&items, bounds, line_height) {
        xy_cut(left, bounds, line_height, starts_column, rows);
        xy_cut(right, bounds, line_height, true, rows);
        return;
    }
    // Rows: lines whose vertical centers fall inside a common band.
    let mut sorted = items;
    sorted.sort_by(|&a, &b| bounds[a].y0.total_cmp(&bounds[b].y0));
    let mut bands: Vec<(f32, f32, Vec<usize>)> = Vec::new();
    for i in sorted {
        let b = bounds[i];
        match bands.last_mut() {
            Some((y0, y1, members)) if b.center_y() <= *y1 || center_of(members, bounds) >= b.y0 => {
                *y0 = y0.min(b.y0);
                *y1 = y1.max(b.y1);
                members.push(i);
            }
            _ => bands.push((b.y0, b.y1, vec![i])),
        }
    }
    if bands.len() == 1 {
        let mut row = bands.pop().map(|b| b.2).unwrap_or_default();
        row.sort_by(|&a, &b| bounds[a].x0.total_cmp(&bounds[b].x0));
        rows.push(Row { items: row, starts_column });
        return;
    }
    // Split at the widest gap between bands; each half may hold columns.
    let cut = (1..bands.len())
        .max_by(|&a, &b| {
            let gap = |k: usize| bands[k].0 - bands[k - 1].1;
            gap(a).total_cmp(&gap(b)).then(b.cmp(&a))
        })
        .unwrap_or(1);
    let lower: Vec<usize> = bands.drain(cut..).flat_map(|b| b.2).collect();
    let upper: Vec<usize> = bands.into_iter().flat_map(|b| b.2).collect();
    xy_cut(upper, bounds, line_height, starts_column, rows);
    xy_cut(lower, bounds, line_height, false, rows);
}

fn center_of(members: &[usize], bounds: &[Bounds]) -> f32 {
    let sum: f32 = members.iter().map(|&i| bounds[i].center_y()).sum();
    sum / members.len() as f32
}

/// The widest vertical gutter through the region, if it separates two
/// columns of text.
fn column_split(items: &[usize], bounds: &[Bounds], line_height: f32) -> Option<(Vec<usize>, Vec<usize>)> {
    if items.len() < 4 {
        return None;
    }
    let mut spans: Vec<(f32, f32)> = items.iter().map(|&i| (bounds[i].x0, bounds[i].x1)).collect();
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut best: Option<(f32, f32)> = None;
    let mut reach = spans[0].1;
    for &(x0, x1) in &spans[1..] {
        if x0 > reach && best.is_none_or(|(a, b)| x0 - reach > b - a) {
            best = Some((reach, x0));
        }
        reach = reach.max(x1);
    }
    let (gap_start, gap_end) = best?;
    let gutter = gap_end - gap_start;
    if gutter < MIN_GUTTER * line_height {
        return None;
    }
    let (left, right): (Vec<usize>, Vec<usize>) = items.iter().partition(|&&i| bounds[i].x1 <= gap_start);
    let width = |side: &[usize]| {
        side.iter().map(|&i| bounds[i].x1).fold(f32::MIN, f32::max)
            - side.iter().map(|&i| bounds[i].x0).fold(f32::MAX, f32::min)
    };
    let is_column = |side: &[usize]| side.len() >= 2 && width(side) >= MIN_COLUMN_TO_GUTTER * gutter;
    (is_column(&left) && is_column(&right)).then_some((left, right))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rect(x0: f32, y0: f32, x1: f32, y1: f32) -> Quad {
        [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
    }

    fn text(order: &[(usize, Join)], words: &[&str]) -> String {
        let mut out = String::new();
        for (k, &(i, join)) in order.iter().enumerate() {
            if k > 0 {
                out.push_str(join.as_str());
            }
            out.push_str(words[i]);
        }
        out
    }

    #[test]
    fn rows_are_read_left_to_right_and_paragraphs_are_kept() {
        // Given out of order: a row of two boxes, a line, then a paragraph.
        let quads = [
            rect(300.0, 10.0, 380.0, 40.0),
            rect(10.0, 12.0, 120.0, 41.0),
            rect(10.0, 45.0, 200.0, 75.0),
            rect(10.0, 120.0, 200.0, 150.0),
        ];
        let order = reading_order(&quads);
        assert_eq!(
            text(&order, &["$58.90", "Total", "thank you", "come again"]),
            "Total $58.90\nthank you\n\ncome again"
        );
    }

    #[test]
    fn two_columns_under_a_title_are_read_one_after_the_other() {
        let mut quads = vec![rect(10.0, 10.0, 600.0, 50.0)];
        let mut words = vec!["Title".to_string()];
        for row in 0..4 {
            let y = 90.0 + row as f32 * 36.0;
            quads.push(rect(10.0, y, 280.0, y + 30.0));
            words.push(format!("L{row}"));
            quads.push(rect(330.0, y, 600.0, y + 30.0));
            words.push(format!("R{row}"));
        }
        let words: Vec<&str> = words.iter().map(|s| s.as_str()).collect();
        let order = reading_order(&quads);
        assert_eq!(text(&order, &words), "Title\n\nL0\nL1\nL2\nL3\n\nR0\nR1\nR2\nR3");
    }

    #[test]
    fn a_price_column_is_not_a_text_column() {
        let mut quads = Vec::new();
        let mut words = Vec::new();
        for (row, (item, price)) in
            [("Coffee", "3.50"), ("Bagel with cream cheese", "4.25"), ("Juice", "2.00")].into_iter().enumerate()
        {
            let y = 10.0 + row as f32 * 34.0;
            quads.push(rect(10.0, y, 40.0 + item.len() as f32 * 14.0, y + 30.0));
            quads.push(rect(500.0, y, 560.0, y + 30.0));
            words.extend([item, price]);
        }
        let order = reading_order(&quads);
        assert_eq!(text(&order, &words), "Coffee 3.50\nBagel with cream cheese 4.25\nJuice 2.00");
    }

    #[test]
    fn a_skewed_page_keeps_its_rows() {
        // Three long lines turned by 4 degrees: their axis-aligned boxes overlap.
        let angle = 4f32.to_radians();
        let turn = |[x, y]: [f32; 2]| [x * angle.cos() - y * angle.sin(), x * angle.sin() + y * angle.cos()];
        let quads: Vec<Quad> =
            (0..3).map(|k| rect(20.0, 20.0 + 34.0 * k as f32, 820.0, 50.0 + 34.0 * k as f32).map(turn)).collect();
        let order = reading_order(&quads);
        assert_eq!(text(&order, &["one", "two", "three"]), "one\ntwo\nthree");
    }
}
