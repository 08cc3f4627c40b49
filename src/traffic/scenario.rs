//! Scenario files for the terminal simulator (`pingate-terminal scenario FILE`): a sequence of messages a terminal
//! sends, each with the response code it expects and an optional delay before it. Written in TOML:
//!
//! ```toml
//! [[step]]
//! send = "sale"          # sale | repeat | reversal | advice | echo | sign-on | sign-off
//! product = "GIFT-25"
//! amount = 2500
//! stan = 1
//! expect = "00"
//!
//! [[step]]
//! send = "repeat"        # a 0201 of the sale with STAN 1: the same PIN must come back
//! of = 1
//! expect = "00"
//! same_pin = true
//!
//! [[step]]
//! send = "reversal"      # a 0400 of the sale with STAN 1, sent with its own STAN 2 (a sale from before this
//! of = 1                 # scenario: give its product and amount)
//! stan = 2
//! delay_ms = 100
//! expect = "00"
//! ```

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;

use crate::iso8583::{Dialect, Message};
use crate::sale::PinReceipt;
use crate::traffic::sim::{Identity, SaleSpec, TerminalClient};

/// A terminal's way of sending a request and getting its answer: a TCP connection ([`TerminalClient`]) or a serial
/// line (the dial-up simulator's `LineClient` implements it).
pub trait Exchange {
    fn exchange(
        &mut self,
        msg: &Message,
    ) -> impl std::future::Future<Output = Result<Message, String>> + std::marker::Send;
}

impl Exchange for TerminalClient {
    async fn exchange(&mut self, msg: &Message) -> Result<Message, String> {
        self.call(msg).await.map_err(|e| e.to_string())
    }
}

/// Errors of a scenario file.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// Not valid TOML for a scenario (unknown keys included).
    #[error("scenario: {0}")]
    Parse(String),
    /// A step that cannot be built; `step` counts from 1.
    #[error("scenario step {step}: {reason}")]
    Step { step: usize, reason: String },
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default, rename = "step")]
    steps: Vec<Step>,
}

/// What a step sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Send {
    Sale,
    Repeat,
    Reversal,
    Advice,
    Echo,
    SignOn,
    SignOff,
}

/// One step of a scenario.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub send: Send,
    pub product: Option<String>,
    pub amount: Option<u64>,
    #[serde(default = "d_currency")]
    pub currency: String,
    /// The message's own STAN (default: one more than the last step's).
    pub stan: Option<u32>,
    /// For repeats and reversals: the STAN of the sale they refer to.
    pub of: Option<u32>,
    /// The response code the answer must carry.
    pub expect: Option<String>,
    /// For repeats: the answer must carry the same PIN as the sale.
    #[serde(default)]
    pub same_pin: bool,
    #[serde(default)]
    pub delay_ms: u64,
}

fn d_currency() -> String {
    "978".into()
}

/// A parsed scenario.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub steps: Vec<Step>,
}

/// What one step got.
#[derive(Clone, Debug)]
pub struct StepResult {
    pub step: usize,
    pub sent: Message,
    /// `None`: no answer (timeout or connection closed); the reason is in `problem`.
    pub answer: Option<Message>,
    /// Why the step failed, if it did.
    pub problem: Option<String>,
}

impl Scenario {
    pub fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        let f: File = toml::from_str(text).map_err(|e| ScenarioError::Parse(e.to_string()))?;
        if f.steps.is_empty() {
            return Err(ScenarioError::Parse("no [[step]]".into()));
        }
        for (i, s) in f.steps.iter().enumerate() {
            let step = i + 1;
            let need = |what: &str| ScenarioError::Step {
                step,
                reason: format!("`{what}` is needed for `{:?}`", s.send),
            };
            match s.send {
                Send::Sale => {
                    s.product.as_ref().ok_or_else(|| need("product"))?;
                    s.amount.ok_or_else(|| need("amount"))?;
                }
                Send::Repeat | Send::Reversal | Send::Advice => {
                    s.of.ok_or_else(|| need("of"))?;
                }
                _ => {}
            }
        }
        Ok(Scenario { steps: f.steps })
    }

    /// Runs the steps on one connection as terminal `id`; `transmission` (MMDDhhmmss) dates every message.
    pub async fn run(
        &self,
        client: &mut impl Exchange,
        id: &Identity,
        transmission: &str,
        timeout: Duration,
    ) -> Result<Vec<StepResult>, ScenarioError> {
        let mut sales: HashMap<u32, (SaleSpec, Option<String>)> = HashMap::new();
        let mut stan = 0u32;
        let mut results = Vec::new();
        for (i, s) in self.steps.iter().enumerate() {
            let step = i + 1;
            stan = s.stan.unwrap_or(stan.saturating_add(1));
            if !(1..=999_999).contains(&stan) {
                return Err(ScenarioError::Step {
                    step,
                    reason: format!("STAN {stan}: 1 to 999999"),
                });
            }
            // The sale a repeat or reversal refers to: an earlier step, or (a sale made before this run) the step's
            // own product and amount.
            let original = |of: u32| match (sales.get(&of), &s.product, s.amount) {
                (Some(x), _, _) => Ok(x.clone()),
                (None, Some(product), Some(amount)) => Ok((
                    SaleSpec {
                        stan: of,
                        transmission: transmission.into(),
                        product: product.clone(),
                        amount,
                        currency: s.currency.clone(),
                    },
                    None,
                )),
                _ => Err(ScenarioError::Step {
                    step,
                    reason: format!("no earlier sale with STAN {of}, and no product and amount to describe it"),
                }),
            };
            let msg = match s.send {
                Send::Sale => {
                    let spec = SaleSpec {
                        stan,
                        transmission: transmission.into(),
                        product: s.product.clone().unwrap_or_default(),
                        amount: s.amount.unwrap_or_default(),
                        currency: s.currency.clone(),
                    };
                    sales.insert(stan, (spec.clone(), None));
                    id.sale(&spec, false)
                }
                Send::Repeat => id.sale(&original(s.of.unwrap_or_default())?.0, true),
                Send::Reversal | Send::Advice => {
                    id.reversal(&original(s.of.unwrap_or_default())?.0, stan, s.send == Send::Advice)
                }
                Send::Echo => id.network(stan, transmission, "301"),
                Send::SignOn => id.network(stan, transmission, "001"),
                Send::SignOff => id.network(stan, transmission, "002"),
            };
            if s.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(s.delay_ms)).await;
            }
            let answer = match tokio::time::timeout(timeout, client.exchange(&msg)).await {
                Ok(Ok(a)) => Ok(a),
                Ok(Err(e)) => Err(format!("no answer: {e}")),
                Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
            };
            let mut r = StepResult {
                step,
                sent: msg,
                answer: None,
                problem: None,
            };
            match answer {
                Err(p) => r.problem = Some(p),
                Ok(a) => {
                    let code = a.get_str(39).unwrap_or("").to_string();
                    if let Some(want) = &s.expect {
                        if *want != code {
                            r.problem = Some(format!("response code {code:?}, expected {want:?}"));
                        }
                    }
                    let pin = a
                        .get(63)
                        .and_then(|f| PinReceipt::from_tlv(f).ok())
                        .map(|p| p.pin.expose().to_string());
                    match s.send {
                        Send::Sale => {
                            if let Some(e) = sales.get_mut(&stan) {
                                e.1 = pin;
                            }
                        }
                        Send::Repeat if s.same_pin => {
                            let first = sales.get(&s.of.unwrap_or_default()).and_then(|e| e.1.clone());
                            if first.is_none() || first != pin {
                                r.problem
                                    .get_or_insert_with(|| "the repeat did not carry the sale's PIN".into());
                            }
                        }
                        _ => {}
                    }
                    r.answer = Some(a);
                }
            }
            results.push(r);
        }
        Ok(results)
    }
}

/// A step's result as one JSON line (the PIN masked unless `reveal`).
pub fn result_json(r: &StepResult, terminal: &str, dialect: &Dialect, reveal: bool) -> serde_json::Value {
    serde_json::json!({
        "terminal": terminal,
        "step": r.step,
        "sent": r.sent.mti().to_string(),
        "answer": r.answer.as_ref().map(|a| dialect.to_json(a, reveal)),
        "ok": r.problem.is_none(),
        "problem": r.problem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_checked_and_mistakes_named() {
        let s = Scenario::parse(
            "[[step]]\nsend = \"sale\"\nproduct = \"P\"\namount = 1\n[[step]]\nsend = \"repeat\"\nof = 1\nsame_pin = true\n",
        )
        .unwrap();
        assert_eq!(s.steps.len(), 2);
        assert_eq!(s.steps[1].send, Send::Repeat);
        let e = Scenario::parse("[[step]]\nsend = \"sale\"\nproduct = \"P\"\n").unwrap_err();
        assert_eq!(e.to_string(), "scenario step 1: `amount` is needed for `Sale`");
        let e = Scenario::parse("[[step]]\nsend = \"reversal\"\n").unwrap_err();
        assert!(e.to_string().contains("`of`"), "{e}");
        let e = Scenario::parse("[[step]]\nsend = \"dance\"\n").unwrap_err();
        assert!(e.to_string().contains("dance"), "{e}");
        let e = Scenario::parse("[[step]]\nsend = \"echo\"\nexpcet = \"00\"\n").unwrap_err();
        assert!(e.to_string().contains("expcet"), "{e}");
        assert!(Scenario::parse("").is_err());
    }
}
