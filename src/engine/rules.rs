//! The rules file: what each event is worth, how fast it fades, and where the
//! segment and hand-off lines sit. Parsed from TOML, checked as a whole (every
//! problem is reported, not just the first), then compiled for fast matching.

use std::collections::BTreeMap;
use std::time::Duration;

use regex_automata::meta::Regex;
use regex_syntax::hir::{Hir, HirKind};
use serde::{Deserialize, Serialize};

use crate::event::{EventType, Millis, Source};

/// The rules shipped with the binary (`config/rules.default.toml`).
pub const DEFAULT_RULES: &str = include_str!("../../config/rules.default.toml");

/// Most decay groups (the default group included).
pub const MAX_GROUPS: usize = 16;

/// Scores are exact to this many points (they are read from exact integer
/// sums through floating point): a score this close to a threshold counts as
/// on it, so 25 points enter a segment whose `enter` is 25.
pub const SCORE_TOLERANCE: f64 = 1e-6;

/// A score as published (segment changes, hand-offs, the lead view):
/// rounded to six decimal places, the precision scores are compared with
/// thresholds at ([`SCORE_TOLERANCE`]). What floating point adds to an
/// exact sum (25 points read back as 24.99999999998895, which enter `warm`)
/// is gone: published as 25, a score agrees with its segment; only a sum
/// genuinely within half a millionth below a threshold would not.
pub fn published(score: f64) -> f64 {
    if !score.is_finite() {
        return score;
    }
    (score * 1e6).round() / 1e6
}

/// A rules file as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    /// Version carried by every output event, so consumers know which rules produced it.
    pub version: String,
    /// How engagement and fit combine into the total score.
    #[serde(default)]
    pub score: ScoreWeights,
    /// Exponential decay of engagement.
    pub decay: DecayConfig,
    /// Nurture segments, lowest first.
    pub segments: Vec<SegmentConfig>,
    /// When a lead is handed to sales.
    pub handoff: HandoffConfig,
    /// Email-specific behaviour (re-engagement, machine opens).
    #[serde(default)]
    pub email: EmailConfig,
    /// Lifecycle behaviour (not-ready period).
    #[serde(default)]
    pub lifecycle: LifecycleConfig,
    /// Profile fit scoring.
    #[serde(default)]
    pub fit: FitConfig,
    /// Messaging channels (email, SMS, chat apps).
    #[serde(default)]
    pub messaging: MessagingConfig,
    /// How many messages a lead may receive per rolling window before resting.
    #[serde(default)]
    pub frequency_cap: FrequencyCapConfig,
    /// First-touch attribution (source and campaign of the earliest event carrying one).
    #[serde(default)]
    pub attribution: AttributionConfig,
    /// Engagement rules; for each event the first matching rule applies.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

/// Messaging channels.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessagingConfig {
    /// Channel names accepted in the `channel` field of messaging events
    /// (the email topic); the first is the default when the field is absent.
    pub channels: Vec<String>,
}

impl Default for MessagingConfig {
    fn default() -> Self {
        MessagingConfig {
            channels: ["email", "sms", "zalo", "whatsapp"]
                .map(String::from)
                .to_vec(),
        }
    }
}

/// A rolling-window cap on messages delivered to one lead, across channels.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrequencyCapConfig {
    /// Deliveries within `window` that put the lead to rest (0 or absent: no cap).
    #[serde(default)]
    pub max_messages: u8,
    /// The rolling window.
    #[serde(default, with = "humantime_serde")]
    pub window: Option<Duration>,
}

/// First-touch attribution.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttributionConfig {
    /// Attributes naming the source, first present wins (e.g. `utm_source`).
    pub source_attributes: Vec<String>,
    /// Attributes naming the campaign, first present wins.
    pub campaign_attributes: Vec<String>,
    /// Sources that get their own metric label; others are counted as `other`.
    pub sources: Vec<String>,
}

impl Default for AttributionConfig {
    fn default() -> Self {
        AttributionConfig {
            source_attributes: vec!["utm_source".into(), "source".into()],
            campaign_attributes: vec![
                "utm_campaign".into(),
                "campaign".into(),
                "campaign_id".into(),
            ],
            sources: [
                "google",
                "facebook",
                "instagram",
                "tiktok",
                "zalo",
                "newsletter",
                "direct",
                "referral",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// Total = `engagement_weight` × engagement + `fit_weight` × fit.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreWeights {
    /// Weight of the engagement score (≥ 0).
    pub engagement_weight: f64,
    /// Weight of the fit score (≥ 0).
    pub fit_weight: f64,
}

impl Default for ScoreWeights {
    fn default() -> Self {
        ScoreWeights {
            engagement_weight: 1.0,
            fit_weight: 1.0,
        }
    }
}

/// Decay half-lives.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecayConfig {
    /// Half-life of rules without a group, e.g. `"7d"`.
    #[serde(with = "humantime_serde")]
    pub half_life: Duration,
    /// Half-lives of named rule groups, e.g. `email = "3d"`.
    #[serde(default, with = "humantime_map")]
    pub groups: BTreeMap<String, Duration>,
}

mod humantime_map {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<String, Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        map.iter()
            .map(|(k, v)| (k.clone(), humantime::format_duration(*v).to_string()))
            .collect::<BTreeMap<_, _>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Duration>, D::Error> {
        let raw = BTreeMap::<String, String>::deserialize(d)?;
        raw.into_iter()
            .map(|(k, v)| {
                humantime::parse_duration(&v)
                    .map(|d| (k.clone(), d))
                    .map_err(|e| serde::de::Error::custom(format!("group {k}: {e}")))
            })
            .collect()
    }
}

/// One nurture segment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentConfig {
    /// Name used in outputs and metrics (e.g. `warm`).
    pub name: String,
    /// Total score at or above which a lead enters; omitted for the lowest segment.
    #[serde(default)]
    pub enter: Option<f64>,
    /// Total score below which a lead leaves (downwards); defaults to `enter - margin`.
    #[serde(default)]
    pub exit: Option<f64>,
    /// Hysteresis margin, used when `exit` is not given (default 0).
    #[serde(default)]
    pub margin: Option<f64>,
    /// Minimum time in this segment before decay or events may move the lead down.
    #[serde(default, with = "humantime_serde")]
    pub min_dwell: Option<Duration>,
}

/// The hand-to-sales condition.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoffConfig {
    /// Minimum total score.
    pub min_score: f64,
    /// Minimum fit grade (`A` best … `D`); omitted: any grade.
    #[serde(default)]
    pub min_grade: Option<Grade>,
    /// The lead's last engagement must be at most this old.
    #[serde(default, with = "humantime_serde")]
    pub within: Option<Duration>,
    /// After a hand-off, the next one needs the total to fall below this first (or a CRM recycle).
    pub rearm_below: f64,
    /// Minimum time between two hand-offs of one lead.
    #[serde(default, with = "humantime_serde")]
    pub cooldown: Option<Duration>,
    /// How many top contributing signals a hand-off carries.
    #[serde(default = "default_top_signals")]
    pub top_signals: usize,
    /// Whether a lead with no profile yet (unknown fit) may be handed off
    /// when `min_grade` is set: `allow` (default) or `block`.
    #[serde(default)]
    pub unknown_fit: UnknownFit,
}

/// Hand-off policy for leads whose fit is unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownFit {
    /// Unknown fit passes the grade condition.
    #[default]
    Allow,
    /// Unknown fit fails the grade condition.
    Block,
}

fn default_top_signals() -> usize {
    5
}

/// Messaging behaviour (named after email, its first channel).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// This many deliveries in a row on one channel without an open, click or
    /// reply on it move the lead to `reengage` (0: off).
    pub reengage_after: u8,
    /// Opens this soon after delivery are machine opens (privacy proxies, scanners) and count zero.
    #[serde(with = "humantime_serde")]
    pub machine_open_window: Duration,
}

impl Default for EmailConfig {
    fn default() -> Self {
        EmailConfig {
            reengage_after: 3,
            machine_open_window: Duration::from_secs(5),
        }
    }
}

/// Lifecycle behaviour.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleConfig {
    /// How long a `not_ready` lead waits before returning to nurture.
    #[serde(with = "humantime_serde")]
    pub not_ready_period: Duration,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            not_ready_period: Duration::from_secs(90 * 86_400),
        }
    }
}

/// Fit grades, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Hash)]
pub enum Grade {
    /// Best fit.
    A,
    /// Good fit.
    B,
    /// Weak fit.
    C,
    /// Poor fit (a profile is known and scores low; no profile is no grade).
    D,
}

impl Grade {
    /// The letter.
    pub fn as_str(self) -> &'static str {
        match self {
            Grade::A => "A",
            Grade::B => "B",
            Grade::C => "C",
            Grade::D => "D",
        }
    }
}

/// Profile fit scoring.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FitConfig {
    /// Minimum fit score for grades A, B and C; below C is D.
    #[serde(default)]
    pub grades: GradeThresholds,
    /// Fit rules; for each profile attribute the first matching rule on it applies.
    #[serde(default)]
    pub rules: Vec<FitRuleConfig>,
}

/// Grade thresholds on the fit score.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GradeThresholds {
    /// Minimum fit for A.
    pub a: f64,
    /// Minimum fit for B.
    pub b: f64,
    /// Minimum fit for C.
    pub c: f64,
}

impl Default for GradeThresholds {
    fn default() -> Self {
        GradeThresholds {
            a: 40.0,
            b: 25.0,
            c: 10.0,
        }
    }
}

/// One fit rule on one profile attribute.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FitRuleConfig {
    /// Rule name, shown in explanations.
    pub name: String,
    /// The predicate on one profile attribute.
    #[serde(flatten)]
    pub predicate: PredicateConfig,
    /// Points when it matches.
    pub points: f64,
}

/// One engagement rule.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Rule name, shown in outputs and explanations.
    pub name: String,
    /// The source family it matches.
    pub source: Source,
    /// The event type it matches.
    #[serde(rename = "type")]
    pub kind: String,
    /// Attribute predicates; all must hold.
    #[serde(default)]
    pub when: Vec<PredicateConfig>,
    /// Points (negative allowed).
    pub points: f64,
    /// Decay group (see `decay.groups`); omitted: the default half-life.
    #[serde(default)]
    pub group: Option<String>,
    /// Optional cap per lead per window.
    #[serde(default)]
    pub cap: Option<CapConfig>,
    /// A lifecycle stage the match moves the lead to (e.g. `customer` for a
    /// completed booking): an exit from behaviour, not only from the CRM.
    #[serde(default)]
    pub then: Option<Stage>,
}

/// Lifecycle stages a rule can move a lead to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Bought or booked: out of nurture.
    Customer,
    /// In the sales pipeline: out of nurture.
    OpportunityOpen,
    /// Said "not now": re-nurtured after the not-ready period.
    NotReady,
    /// Not a prospect: no nurture.
    Disqualified,
}

impl Stage {
    /// The CRM `stage` value with the same meaning.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Customer => "customer",
            Stage::OpportunityOpen => "opportunity_open",
            Stage::NotReady => "not_ready",
            Stage::Disqualified => "disqualified",
        }
    }
}

/// At most `max_matches` matches or `max_points` points per lead per tumbling window.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapConfig {
    /// Most matches that count per window.
    #[serde(default)]
    pub max_matches: Option<u32>,
    /// Most points (absolute) that count per window.
    #[serde(default)]
    pub max_points: Option<f64>,
    /// Window length (windows are aligned to the Unix epoch in event time).
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

/// A predicate on one attribute. Exactly one operator must be set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredicateConfig {
    /// The attribute name.
    pub attribute: String,
    /// Equal to this string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<String>,
    /// Equal to one of these strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<String>>,
    /// Contains this substring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contains: Option<String>,
    /// Matches this regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// Parses as a number greater than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gt: Option<f64>,
    /// Parses as a number at least this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gte: Option<f64>,
    /// Parses as a number less than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lt: Option<f64>,
    /// Parses as a number at most this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lte: Option<f64>,
}

/// A compiled predicate.
#[derive(Debug, Clone)]
pub enum Predicate {
    /// Equal.
    Equals(String),
    /// One of.
    OneOf(Vec<String>),
    /// Substring.
    Contains(String),
    /// Regular expression.
    Regex(Regex),
    /// Numeric comparison: value `op` bound.
    Number(NumOp, f64),
}

/// Numeric comparison operators.
#[derive(Debug, Clone, Copy)]
pub enum NumOp {
    /// Greater than.
    Gt,
    /// Greater or equal.
    Gte,
    /// Less than.
    Lt,
    /// Less or equal.
    Lte,
}

impl Predicate {
    /// Does the attribute value satisfy it?
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Predicate::Equals(s) => value == s,
            Predicate::OneOf(list) => list.iter().any(|s| s == value),
            Predicate::Contains(s) => value.contains(s.as_str()),
            Predicate::Regex(r) => r.is_match(value),
            // A number is a finite one: "inf", "NaN" and "1e400" (which
            // parses as infinity) are text that says no amount.
            Predicate::Number(op, bound) => match value.trim().parse::<f64>() {
                Ok(n) if n.is_finite() => match op {
                    NumOp::Gt => n > *bound,
                    NumOp::Gte => n >= *bound,
                    NumOp::Lt => n < *bound,
                    NumOp::Lte => n <= *bound,
                },
                _ => false,
            },
        }
    }
}

/// Compiles a predicate's pattern for matching only, within the limits
/// `regex` sets by default (regex-automata's defaults: nesting, program and
/// cache sizes). Its groups are made
/// non-capturing first, which changes nothing a match answers: a pattern
/// that is then a set of literals (`/(menu|blog)`) is searched for as
/// literals, without running an automaton, which regex-automata does only
/// for patterns without capture groups.
pub(crate) fn compile_regex(pattern: &str) -> Result<Regex, String> {
    let hir = regex_syntax::ParserBuilder::new()
        .build()
        .parse(pattern)
        .map_err(|e| e.to_string())?;
    Regex::builder()
        .build_from_hir(&without_captures(hir))
        .map_err(|e| e.to_string())
}

/// The same expression with every capture group replaced by its contents.
fn without_captures(hir: Hir) -> Hir {
    match hir.into_kind() {
        HirKind::Capture(c) => without_captures(*c.sub),
        HirKind::Concat(subs) => Hir::concat(subs.into_iter().map(without_captures).collect()),
        HirKind::Alternation(subs) => {
            Hir::alternation(subs.into_iter().map(without_captures).collect())
        }
        HirKind::Repetition(mut r) => {
            r.sub = Box::new(without_captures(*r.sub));
            Hir::repetition(r)
        }
        HirKind::Empty => Hir::empty(),
        HirKind::Literal(l) => Hir::literal(l.0),
        HirKind::Class(c) => Hir::class(c),
        HirKind::Look(l) => Hir::look(l),
    }
}

impl PredicateConfig {
    fn compile(&self, at: &str, problems: &mut Vec<String>) -> Option<(String, Predicate)> {
        let mut ops = Vec::new();
        if let Some(s) = &self.equals {
            ops.push(Predicate::Equals(s.clone()));
        }
        if let Some(list) = &self.one_of {
            if list.is_empty() {
                problems.push(format!("{at}: one_of is empty"));
            }
            ops.push(Predicate::OneOf(list.clone()));
        }
        if let Some(s) = &self.contains {
            ops.push(Predicate::Contains(s.clone()));
        }
        if let Some(r) = &self.regex {
            match compile_regex(r) {
                Ok(re) => ops.push(Predicate::Regex(re)),
                Err(e) => {
                    problems.push(format!("{at}: bad regex {r:?}: {e}"));
                    return None;
                }
            }
        }
        for (op, bound) in [
            (NumOp::Gt, self.gt),
            (NumOp::Gte, self.gte),
            (NumOp::Lt, self.lt),
            (NumOp::Lte, self.lte),
        ] {
            if let Some(b) = bound {
                if !b.is_finite() {
                    problems.push(format!("{at}: numeric bound must be finite"));
                }
                ops.push(Predicate::Number(op, b));
            }
        }
        if self.attribute.is_empty() {
            problems.push(format!("{at}: attribute is empty"));
        }
        match ops.len() {
            1 => Some((self.attribute.clone(), ops.pop()?)),
            0 => {
                problems.push(format!(
                    "{at}: no operator (equals, one_of, contains, regex, gt, gte, lt, lte)"
                ));
                None
            }
            _ => {
                problems.push(format!("{at}: more than one operator in one predicate"));
                None
            }
        }
    }
}

/// A compiled engagement rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Name.
    pub name: String,
    /// Attribute predicates.
    pub when: Vec<(String, Predicate)>,
    /// Points.
    pub points: f64,
    /// Index into [`Rules::half_lives`].
    pub group: usize,
    /// Cap, if any.
    pub cap: Option<Cap>,
    /// Lifecycle stage a match moves the lead to.
    pub then: Option<Stage>,
}

/// A compiled cap.
#[derive(Debug, Clone, Copy)]
pub struct Cap {
    /// Most matches per window.
    pub max_matches: Option<u32>,
    /// Most absolute points per window.
    pub max_points: Option<f64>,
    /// Window length in ms.
    pub window_ms: Millis,
}

/// A compiled fit rule.
#[derive(Debug, Clone)]
pub struct FitRule {
    /// Name.
    pub name: String,
    /// The profile attribute.
    pub attribute: String,
    /// Index of the attribute among [`Rules::fit_attributes`].
    pub slot: u8,
    /// Predicate.
    pub predicate: Predicate,
    /// Points.
    pub points: f64,
}

/// One compiled segment tier.
#[derive(Debug, Clone)]
pub struct Tier {
    /// Name.
    pub name: String,
    /// Enter threshold (−∞ for the lowest), less [`SCORE_TOLERANCE`].
    pub enter: f64,
    /// Exit threshold (−∞ for the lowest), less [`SCORE_TOLERANCE`].
    pub exit: f64,
    /// Minimum dwell in ms before moving down.
    pub min_dwell_ms: Millis,
}

/// Compiled rules, ready for the engine. Immutable and shared.
#[derive(Debug, Clone)]
pub struct Rules {
    /// The version string.
    pub version: String,
    /// Score weights.
    pub weights: ScoreWeights,
    /// Half-life in ms per decay group; group 0 is the default.
    pub half_lives: Vec<i64>,
    /// Group names, parallel to `half_lives` (group 0 is `default`).
    pub group_names: Vec<String>,
    /// Nurture tiers, lowest first.
    pub tiers: Vec<Tier>,
    /// Hand-off condition.
    pub handoff: HandoffConfig,
    /// Hand-off recency window in ms.
    pub handoff_within_ms: Option<Millis>,
    /// Hand-off cool-down in ms.
    pub handoff_cooldown_ms: Millis,
    /// Email behaviour.
    pub email: EmailConfig,
    /// Machine-open window in ms.
    pub machine_open_ms: Millis,
    /// Not-ready period in ms.
    pub not_ready_ms: Millis,
    /// Grade thresholds.
    pub grades: GradeThresholds,
    /// Fit rules.
    pub fit_rules: Vec<FitRule>,
    /// Distinct profile attributes used by fit rules.
    pub fit_attributes: Vec<String>,
    /// Engagement rules.
    pub rules: Vec<Rule>,
    /// Messaging channels; index 0 is the default.
    pub channels: Vec<String>,
    /// Frequency cap: (max messages, window ms), if any.
    pub frequency_cap: Option<(u8, Millis)>,
    /// First-touch attribution.
    pub attribution: AttributionConfig,
    /// Per (source, type): indices into `rules`, in file order.
    by_type: BTreeMap<(Source, EventType), Vec<u16>>,
}

/// Every problem found in a rules file.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid rules:\n  - {}", .0.join("\n  - "))]
pub struct RulesError(pub Vec<String>);

fn ms(d: Duration) -> Millis {
    d.as_millis().min(i64::MAX as u128) as Millis
}

impl Rules {
    /// Parses and compiles a rules file.
    pub fn from_toml(text: &str) -> Result<Rules, RulesError> {
        let file: RulesFile = toml::from_str(text).map_err(|e| RulesError(vec![e.to_string()]))?;
        Rules::compile(file)
    }

    /// The shipped default rules.
    pub fn default_rules() -> Rules {
        Rules::from_toml(DEFAULT_RULES).expect("shipped default rules are valid (checked by tests)")
    }

    /// Checks a parsed rules file as a whole and compiles it.
    pub fn compile(file: RulesFile) -> Result<Rules, RulesError> {
        let mut problems = Vec::new();
        if file.version.trim().is_empty() {
            problems.push("version: must not be empty".into());
        }
        let w = &file.score;
        if !(w.engagement_weight.is_finite() && w.engagement_weight >= 0.0) {
            problems.push("score.engagement_weight: must be a finite number ≥ 0".into());
        }
        if !(w.fit_weight.is_finite() && w.fit_weight >= 0.0) {
            problems.push("score.fit_weight: must be a finite number ≥ 0".into());
        }
        let mut group_names = vec!["default".to_owned()];
        let mut half_lives = vec![ms(file.decay.half_life)];
        if file.decay.half_life.is_zero() {
            problems.push("decay.half_life: must be greater than zero".into());
        }
        for (name, hl) in &file.decay.groups {
            if hl.is_zero() {
                problems.push(format!("decay.groups.{name}: must be greater than zero"));
            }
            group_names.push(name.clone());
            half_lives.push(ms(*hl));
        }

        if half_lives.len() > MAX_GROUPS {
            problems.push(format!("decay.groups: at most {} groups", MAX_GROUPS - 1));
        }
        let tiers = compile_tiers(&file.segments, &mut problems);

        let h = &file.handoff;
        if !h.min_score.is_finite() || !h.rearm_below.is_finite() {
            problems.push("handoff: min_score and rearm_below must be finite".into());
        } else if h.rearm_below >= h.min_score {
            problems.push(format!(
                "handoff.rearm_below ({}) must be below handoff.min_score ({})",
                h.rearm_below, h.min_score
            ));
        }
        if file.email.machine_open_window > Duration::from_secs(3600) {
            problems.push("email.machine_open_window: at most 1h".into());
        }
        let g = &file.fit.grades;
        if !(g.a > g.b && g.b > g.c) {
            problems.push(format!(
                "fit.grades: thresholds must fall strictly from a to c (a={}, b={}, c={})",
                g.a, g.b, g.c
            ));
        }

        let mut fit_attributes: Vec<String> = Vec::new();
        let mut fit_rules = Vec::new();
        for (i, fr) in file.fit.rules.iter().enumerate() {
            let at = format!("fit.rules[{i}] ({})", fr.name);
            if !fr.points.is_finite() {
                problems.push(format!("{at}: points must be finite"));
            }
            if let Some((attribute, predicate)) = fr.predicate.compile(&at, &mut problems) {
                let slot = match fit_attributes.iter().position(|a| *a == attribute) {
                    Some(s) => s,
                    None => {
                        fit_attributes.push(attribute.clone());
                        fit_attributes.len() - 1
                    }
                };
                if slot > u8::MAX as usize {
                    problems.push(format!("{at}: too many distinct fit attributes"));
                    continue;
                }
                fit_rules.push(FitRule {
                    name: fr.name.clone(),
                    attribute,
                    slot: slot as u8,
                    predicate,
                    points: fr.points,
                });
            }
        }

        let mut rules = Vec::new();
        let mut by_type: BTreeMap<(Source, EventType), Vec<u16>> = BTreeMap::new();
        let mut names = std::collections::BTreeSet::new();
        for (i, rc) in file.rules.iter().enumerate() {
            let at = format!("rules[{i}] ({})", rc.name);
            if !names.insert(rc.name.clone()) {
                problems.push(format!("{at}: duplicate rule name"));
            }
            let Some(kind) = EventType::parse(rc.source, &rc.kind) else {
                problems.push(format!(
                    "{at}: type {:?} is not a {} event type",
                    rc.kind, rc.source
                ));
                continue;
            };
            if !(rc.points.is_finite() && rc.points.abs() <= super::exact::MAX_POINTS) {
                problems.push(format!(
                    "{at}: points must be finite and within ±{}",
                    super::exact::MAX_POINTS
                ));
            }
            let group = match &rc.group {
                None => 0,
                Some(name) => match group_names.iter().position(|g| g == name) {
                    Some(g) => g,
                    None => {
                        problems.push(format!("{at}: unknown decay group {name:?}"));
                        0
                    }
                },
            };
            let cap = rc.cap.as_ref().map(|c| {
                if c.window.is_zero() {
                    problems.push(format!("{at}: cap.window must be greater than zero"));
                }
                if c.max_matches.is_none() && c.max_points.is_none() {
                    problems.push(format!("{at}: cap needs max_matches or max_points"));
                }
                if c.max_points.is_some_and(|p| !(p.is_finite() && p > 0.0)) {
                    problems.push(format!("{at}: cap.max_points must be > 0"));
                }
                Cap {
                    max_matches: c.max_matches,
                    max_points: c.max_points,
                    window_ms: ms(c.window).max(1),
                }
            });
            let when = rc
                .when
                .iter()
                .enumerate()
                .filter_map(|(j, p)| p.compile(&format!("{at}.when[{j}]"), &mut problems))
                .collect();
            if rules.len() >= u16::MAX as usize {
                problems.push("rules: too many rules".into());
                break;
            }
            by_type
                .entry((rc.source, kind))
                .or_default()
                .push(rules.len() as u16);
            rules.push(Rule {
                name: rc.name.clone(),
                when,
                points: rc.points,
                group,
                cap,
                then: rc.then,
            });
        }

        let channels = file.messaging.channels.clone();
        if channels.is_empty() {
            problems.push("messaging.channels: at least one channel is needed".into());
        }
        if channels.len() > 64 {
            problems.push("messaging.channels: at most 64".into());
        }
        for (i, c) in channels.iter().enumerate() {
            if c.is_empty()
                || c.len() > 32
                || !c
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                problems.push(format!(
                    "messaging.channels[{i}]: {c:?} must be 1..=32 characters of a-z, 0-9 or _"
                ));
            }
            if channels[..i].contains(c) {
                problems.push(format!("messaging.channels: {c:?} is listed twice"));
            }
        }
        let frequency_cap = match (file.frequency_cap.max_messages, file.frequency_cap.window) {
            (0, _) => None,
            (n, Some(w)) if !w.is_zero() => Some((n, ms(w))),
            (_, _) => {
                problems.push(
                    "frequency_cap.window: required (and above zero) when max_messages is set"
                        .into(),
                );
                None
            }
        };
        if file.frequency_cap.max_messages > 64 {
            problems.push("frequency_cap.max_messages: at most 64".into());
        }
        let a = &file.attribution;
        if a.sources.len() > 50 {
            problems.push("attribution.sources: at most 50 (each is a metric label value)".into());
        }
        for s in &a.sources {
            if s == "other" || s == "unknown" {
                problems.push(format!("attribution.sources: {s:?} is reserved"));
            }
        }
        if !problems.is_empty() {
            return Err(RulesError(problems));
        }
        Ok(Rules {
            channels,
            frequency_cap,
            attribution: file.attribution,
            version: file.version,
            weights: file.score,
            half_lives,
            group_names,
            tiers,
            handoff_within_ms: file.handoff.within.map(ms),
            handoff_cooldown_ms: file.handoff.cooldown.map(ms).unwrap_or(0),
            handoff: file.handoff,
            machine_open_ms: ms(file.email.machine_open_window),
            email: file.email,
            not_ready_ms: ms(file.lifecycle.not_ready_period),
            grades: file.fit.grades,
            fit_rules,
            fit_attributes,
            rules,
            by_type,
        })
    }

    /// The first rule matching the event, if any.
    pub fn match_rule(&self, event: &crate::event::Event<'_>) -> Option<u16> {
        let candidates = self.by_type.get(&(event.source, event.kind))?;
        candidates.iter().copied().find(|&i| {
            self.rules[i as usize]
                .when
                .iter()
                .all(|(attr, p)| event.attribute(attr).is_some_and(|v| p.matches(v)))
        })
    }

    /// The index of a messaging channel by name.
    pub fn channel_index(&self, name: &str) -> Option<u8> {
        self.channels
            .iter()
            .position(|c| c == name)
            .map(|i| i as u8)
    }

    /// The metric label of a first-touch source: itself if configured, else `other`.
    pub fn source_label<'a>(&'a self, source: Option<&'a str>) -> &'a str {
        match source {
            None => "unknown",
            Some(s) => self
                .attribution
                .sources
                .iter()
                .find(|c| c.as_str() == s)
                .map_or("other", String::as_str),
        }
    }

    /// The grade of a fit score.
    pub fn grade(&self, fit: f64) -> Grade {
        let g = &self.grades;
        if fit >= g.a {
            Grade::A
        } else if fit >= g.b {
            Grade::B
        } else if fit >= g.c {
            Grade::C
        } else {
            Grade::D
        }
    }
}

fn compile_tiers(segments: &[SegmentConfig], problems: &mut Vec<String>) -> Vec<Tier> {
    if segments.is_empty() {
        problems.push("segments: at least one segment is needed".into());
    }
    let mut tiers = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    // The previous segment's (enter, exit) as written.
    let mut written: Option<(f64, f64)> = None;
    for (i, s) in segments.iter().enumerate() {
        let at = format!("segments[{i}] ({})", s.name);
        if s.name.is_empty() || crate::engine::Segment::is_reserved(&s.name) {
            problems.push(format!("{at}: name is empty or reserved"));
        }
        if !seen.insert(s.name.clone()) {
            problems.push(format!("{at}: duplicate segment name"));
        }
        let (enter, exit) = if i == 0 {
            if s.enter.is_some() || s.exit.is_some() || s.margin.is_some() {
                problems.push(format!(
                    "{at}: the lowest segment takes no enter, exit or margin"
                ));
            }
            (f64::NEG_INFINITY, f64::NEG_INFINITY)
        } else {
            let Some(enter) = s.enter.filter(|e| e.is_finite()) else {
                problems.push(format!("{at}: enter threshold is required and finite"));
                continue;
            };
            if s.exit.is_some() && s.margin.is_some() {
                problems.push(format!("{at}: give exit or margin, not both"));
            }
            let exit = s.exit.unwrap_or(enter - s.margin.unwrap_or(0.0));
            if !exit.is_finite() || exit > enter {
                problems.push(format!(
                    "{at}: exit ({exit}) must be finite and ≤ enter ({enter})"
                ));
            }
            if s.margin.is_some_and(|m| m < 0.0) {
                problems.push(format!("{at}: margin must be ≥ 0"));
            }
            // Compared with the previous segment's thresholds as written,
            // not as held (less the tolerance): the message quotes the file.
            if let Some((prev, _)) = written
                && enter <= prev - SCORE_TOLERANCE
            {
                problems.push(format!(
                    "{at}: enter ({enter}) must be above the previous segment's ({prev})"
                ));
            }
            if let Some((_, prev_exit)) = written
                && exit <= prev_exit - SCORE_TOLERANCE
            {
                problems.push(format!(
                    "{at}: exit ({exit}) must be above the previous segment's exit ({prev_exit})"
                ));
            }
            (enter, exit)
        };
        written = Some((enter, exit));
        tiers.push(Tier {
            name: s.name.clone(),
            enter: enter - SCORE_TOLERANCE,
            exit: exit - SCORE_TOLERANCE,
            min_dwell_ms: s.min_dwell.map(ms).unwrap_or(0),
        });
    }
    if tiers.len() > 200 {
        problems.push("segments: at most 200".into());
    }
    tiers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rules_compile() {
        let r = Rules::default_rules();
        assert!(r.tiers.len() >= 3);
        assert!(!r.rules.is_empty());
    }

    #[test]
    fn every_problem_is_reported() {
        let text = r#"
version = "t"
[decay]
half_life = "0s"
[[segments]]
name = "cold"
[[segments]]
name = "warm"
enter = 50
[[segments]]
name = "hot"
enter = 20
[handoff]
min_score = 10
rearm_below = 20
[[rules]]
name = "x"
source = "web"
type = "open"
points = 1
[[rules]]
name = "y"
source = "web"
type = "page_view"
points = 1
cap = { window = "0s", max_matches = 1 }
when = [{ attribute = "url", regex = "(" }]
"#;
        let err = Rules::from_toml(text).unwrap_err();
        let all = err.0.join("\n");
        for needle in [
            "half_life",
            // The previous threshold as written, not less the tolerance
            // (it said 49.999999).
            "enter (20) must be above the previous segment's (50)",
            "rearm_below",
            "not a web event type",
            "cap.window",
            "bad regex",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in {all}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let text = DEFAULT_RULES.replace("[decay]", "[decay]\nhalf_lief = \"1d\"");
        let err = Rules::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("half_lief"), "{err}");
    }

    #[test]
    fn predicates() {
        assert!(Predicate::Number(NumOp::Gte, 10.0).matches(" 10 "));
        assert!(!Predicate::Number(NumOp::Gt, 10.0).matches("ten"));
        // Text that parses as no amount is no number (a user probe found
        // "inf", "1e400" and "Infinity" earning a budget's points).
        for junk in ["inf", "Infinity", "1e400", "NaN", "-inf"] {
            for op in [NumOp::Gt, NumOp::Gte, NumOp::Lt, NumOp::Lte] {
                assert!(!Predicate::Number(op, 10.0).matches(junk), "{junk}");
            }
        }
        assert!(Predicate::Number(NumOp::Gte, 10.0).matches("1e300"));
        assert!(Predicate::OneOf(vec!["a".into(), "b".into()]).matches("b"));
        assert!(Predicate::Regex(compile_regex("^/menu").unwrap()).matches("/menu/x"));
    }

    /// Groups made non-capturing match what the pattern as written matches,
    /// for the default rules' shapes and for groups under repetition,
    /// anchors, classes and case folding, on matching and non-matching text.
    #[test]
    fn regexes_without_groups_match_as_written() {
        let patterns = [
            "/(price-list|prices|combo)",
            "/(menu|blog)",
            "(?i)(owner|founder|director|head|manager|ceo|vp)",
            "^/(a|b)+/(x(y|z))?$",
            r"(\d{3})-(?P<n>\d+)",
            "(?:plain)|(grouped)",
            "()",
            "",
            "^(?i)ÄB(c)",
        ];
        let texts = [
            "/prices",
            "/x/price-list/1",
            "/combos",
            "/pricing",
            "/menu",
            "/blogroll",
            "/Menu",
            "Head of Sales",
            "VP",
            "intern",
            "/aab/xz",
            "/ab/x",
            "/c",
            "555-1",
            "55-1",
            "plain",
            "grouped",
            "",
            "äbc",
            "ÄBC",
            "äb",
        ];
        for p in patterns {
            let ours = compile_regex(p).unwrap();
            let theirs = regex::Regex::new(p).unwrap();
            for t in texts {
                assert_eq!(ours.is_match(t), theirs.is_match(t), "{p:?} on {t:?}");
            }
        }
        assert!(compile_regex("(").unwrap_err().contains("unclosed group"));
    }
}
