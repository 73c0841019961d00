//! Answer extraction and string metrics (BBH exact match, SQuAD F1 / EM).

use std::collections::HashMap;
use std::sync::LazyLock;

use regex::Regex;

/// Python's `string.punctuation` (ASCII only), which both HF `exact_match`
/// (`ignore_punctuation=True`) and the SQuAD v1.1 script remove.
const ASCII_PUNCT: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

fn is_ascii_punct(c: char) -> bool {
    ASCII_PUNCT.contains(c)
}

/// The first answer after `"So the answer is "`, as LESS's BBH evaluation
/// finds it with Python's `re.search(r"So the answer is (.*?)\.", output)`:
/// the shortest run of non-newline characters followed by a period, from the
/// first occurrence where such a run exists. `None` when there is no match.
/// The same pattern in the `regex` crate (`.` excludes `\n` in both).
pub fn bbh_find_answer(output: &str) -> Option<&str> {
    static CUE: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"So the answer is (.*?)\.").expect("valid regex"));
    CUE.captures(output)
        .and_then(|c| c.get(1))
        .map(|m| m.as_str())
}

/// LESS's BBH prediction from a generation: the stripped answer found by
/// [`bbh_find_answer`], else the stripped first blank-line-separated part of
/// the stripped output.
pub fn bbh_extract_answer(output: &str) -> String {
    match bbh_find_answer(output) {
        Some(a) => a.trim().to_string(),
        None => output
            .trim()
            .split("\n\n")
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
    }
}

/// HF `evaluate` `exact_match` normalisation with `ignore_case=True,
/// ignore_punctuation=True`: lower-case, ASCII punctuation removed (so
/// `"(A)"` and `"A"` agree); whitespace is kept.
pub fn bbh_normalize(s: &str) -> String {
    s.to_lowercase()
        .chars()
        .filter(|c| !is_ascii_punct(*c))
        .collect()
}

/// BBH exact match of a prediction against the target (see [`bbh_normalize`]).
pub fn bbh_exact_match(prediction: &str, target: &str) -> bool {
    bbh_normalize(prediction) == bbh_normalize(target)
}

/// SQuAD v1.1 `normalize_answer` (the `squad` metric LESS's TyDiQA
/// evaluation uses for every language): lower-case, remove ASCII
/// punctuation, remove the English articles `a`, `an`, `the` as whole words
/// (Unicode word boundaries, as Python's `re`), collapse whitespace.
pub fn squad_normalize(s: &str) -> String {
    let lowered: String = s
        .to_lowercase()
        .chars()
        .filter(|c| !is_ascii_punct(*c))
        .collect();
    // SQuAD's `re.sub(r"\b(a|an|the)\b", " ", text)`: whole-word articles
    // become a space. Both engines use Unicode word boundaries; they differ
    // only next to combining marks, which `regex` counts as word characters
    // and Python does not.
    static ARTICLES: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"\b(a|an|the)\b").expect("valid regex"));
    let no_articles = ARTICLES.replace_all(&lowered, " ");
    no_articles.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// SQuAD v1.1 exact match: normalised strings equal.
pub fn squad_exact_match(prediction: &str, gold: &str) -> bool {
    squad_normalize(prediction) == squad_normalize(gold)
}

/// SQuAD v1.1 token F1 over whitespace tokens of the normalised strings
/// (0 when nothing is shared, including when both are empty).
pub fn squad_f1(prediction: &str, gold: &str) -> f64 {
    let p = squad_normalize(prediction);
    let g = squad_normalize(gold);
    let pt: Vec<&str> = p.split_whitespace().collect();
    let gt: Vec<&str> = g.split_whitespace().collect();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for t in &gt {
        *counts.entry(t).or_default() += 1;
    }
    let mut same = 0usize;
    for t in &pt {
        if let Some(c) = counts.get_mut(t) {
            if *c > 0 {
                *c -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / pt.len() as f64;
    let recall = same as f64 / gt.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// `(F1, EM)` of a prediction: each the maximum over the gold answers (as
/// SQuAD's `metric_max_over_ground_truths`); `(0, 0)` without golds.
pub fn squad_max_over_golds(prediction: &str, golds: &[String]) -> (f64, f64) {
    let f1 = golds
        .iter()
        .map(|g| squad_f1(prediction, g))
        .fold(0.0, f64::max);
    let em = golds
        .iter()
        .map(|g| f64::from(u8::from(squad_exact_match(prediction, g))))
        .fold(0.0, f64::max);
    (f1, em)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bbh_extraction_follows_the_less_regex() {
        assert_eq!(
            bbh_extract_answer("Step 1... So the answer is (B). Done."),
            "(B)"
        );
        // Shortest match: stops at the first period.
        assert_eq!(bbh_extract_answer("So the answer is 3.5."), "3");
        // First occurrence wins.
        assert_eq!(
            bbh_extract_answer("So the answer is Yes. Then So the answer is No."),
            "Yes"
        );
        // `.` does not cross a newline: the first cue fails, the second matches.
        assert_eq!(
            bbh_extract_answer("So the answer is x\ny. So the answer is  True ."),
            "True"
        );
        // No cue: first blank-line part of the stripped output.
        assert_eq!(bbh_extract_answer("  valid \n\nmore text"), "valid");
        assert_eq!(bbh_extract_answer(""), "");
        // A cue without a period is no match.
        assert_eq!(
            bbh_extract_answer("So the answer is False"),
            "So the answer is False"
        );
    }

    #[test]
    fn bbh_exact_match_ignores_case_and_punctuation() {
        assert!(bbh_exact_match("(A)", "(A)"));
        assert!(bbh_exact_match("A", "(A)"));
        assert!(bbh_exact_match("true", "True"));
        assert!(bbh_exact_match("[ ( ) ]", "[ ( ) ]"));
        assert!(!bbh_exact_match("(B)", "(A)"));
        // Whitespace is not normalised.
        assert!(!bbh_exact_match("( A )", "(A)"));
        assert!(!bbh_exact_match("Tru e", "True"));
    }

    #[test]
    fn squad_normalisation_and_scores() {
        assert_eq!(squad_normalize("The  Eiffel Tower!"), "eiffel tower");
        assert_eq!(squad_normalize("an apple, a day"), "apple day");
        // Articles only as whole words.
        assert_eq!(squad_normalize("Theatre anA"), "theatre ana");
        assert!(squad_exact_match("the Cat.", "cat"));
        // F1 by hand: pred {paris, france}, gold {paris}: p = 1/2, r = 1 → 2/3.
        assert!((squad_f1("Paris, France", "Paris") - 2.0 / 3.0).abs() < 1e-12);
        // Repeated tokens count with multiplicity: pred [a1 a1 b], gold [a1 b b]:
        // common = min(2,1) + min(1,2) = 2, p = 2/3, r = 2/3 → 2/3.
        assert!((squad_f1("a1 a1 b", "a1 b b") - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(squad_f1("", ""), 0.0);
        assert_eq!(squad_f1("x", "y"), 0.0);
        let golds = vec!["1990".to_string(), "in 1990 AD".to_string()];
        let (f1, em) = squad_max_over_golds("1990 AD", &golds);
        // vs "1990": p=1/2 r=1 → 2/3; vs "in 1990 ad": p=1 r=2/3 → 0.8.
        assert!((f1 - 0.8).abs() < 1e-12);
        assert_eq!(em, 0.0);
        assert_eq!(squad_max_over_golds("1990", &golds), (1.0, 1.0));
        // Non-English text: lower-cased, ASCII punctuation removed, no articles apply.
        assert_eq!(squad_normalize("Dar es Salaam."), "dar es salaam");
        assert_eq!(squad_normalize("서울특별시,"), "서울특별시");
    }
}
