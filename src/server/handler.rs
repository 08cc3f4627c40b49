//! Where PSP meets the inventory: a request becomes a store operation, the store's result becomes an answer. Every
//! conversion from a store type to a PSP one is here (`From<store::X> for psp::Y`), and store errors become wire
//! codes here and nowhere else, so that the protocol core (`crate::psp`) knows nothing of the store.

use super::Shared;
use crate::clock::unix_now;
use crate::logging::limited;
use crate::psp::{
    BatchResult, CatalogEntry, ConfirmItem, ConfirmOutcome, ErrorCode, PinOut, Request, Response, ResponseFrame,
    ReverseOutcome, StockEntry, Terminal, WireError, MAX_CONFIRM_BATCH, MAX_PIN_IDS, MAX_RESERVE, VERSION,
};
use crate::store::{
    Confirmation, Dispensed, Op, Outcome, Product, Reversal, SaleContext, SellRequest, StockRow, StoreError,
};

/// The answer to a gateway's `hello` (of this version): the welcome, with the catalog.
pub(super) async fn welcome(shared: &Shared, gateway: &str, id: u64) -> ResponseFrame {
    match shared.store.call(Op::Catalog).await {
        Ok(Outcome::Catalog(c)) => ResponseFrame::ok(
            id,
            Response::Welcome {
                version: VERSION,
                gateway: gateway.to_string(),
                server: format!("pingate {}", env!("CARGO_PKG_VERSION")),
                catalog: c.into_iter().map(CatalogEntry::from).collect(),
            },
        ),
        other => {
            limited!(warn, "catalog unavailable", ?other);
            ResponseFrame::err(id, ErrorCode::Internal, "catalog unavailable")
        }
    }
}

/// One request → one store operation → one answer, counted and timed for the metrics.
pub(super) async fn handle(shared: &Shared, gateway: &str, id: u64, request: Request) -> ResponseFrame {
    let started = std::time::Instant::now();
    let op = request.op_name();
    let frame = handle_request(shared, gateway, id, request).await;
    shared.metrics.count(op, frame.error.as_ref().map(|e| e.code));
    shared.metrics.latency.observe(started.elapsed());
    frame
}

/// The sale a `terminal` names, sold by `gateway`, or a bad-request message.
fn sale(gateway: &str, t: Terminal) -> Result<SaleContext, String> {
    t.check().map_err(|e| e.to_string())?;
    // A transmission of 10 digits (`MMDDhhmmss`, from a gateway older than keys bound to their year, or its journal)
    // is bound to its year here, as a gateway binds it: by the time it is received.
    let transmission = if t.transmission.len() == 10 && t.transmission.bytes().all(|b| b.is_ascii_digit()) {
        crate::sale::qualify_transmission(&t.transmission, unix_now()).map_err(|e| format!("terminal.{e}"))?
    } else {
        t.transmission
    };
    Ok(SaleContext {
        gateway: gateway.to_string(),
        terminal_id: t.terminal_id,
        merchant_id: t.merchant_id,
        stan: t.stan,
        transmission,
        rrn: t.rrn,
    })
}

impl Shared {
    fn count_confirmation(&self, c: Confirmation) {
        if matches!(c, Confirmation::Conflict { .. }) {
            self.metrics.confirm_conflicts.inc();
        }
    }
}

fn lease_until(shared: &Shared, secs: u64) -> Result<i64, String> {
    if secs == 0 || secs > shared.opts.max_lease.as_secs() {
        return Err(format!("lease_secs: 1 to {}", shared.opts.max_lease.as_secs()));
    }
    Ok(unix_now() + secs as i64)
}

/// The wire error of a store error. An internal error's text is not sent (the caller logs it).
fn wire_error(e: &StoreError) -> WireError {
    let code = ErrorCode::from(e);
    let message = match code {
        ErrorCode::Internal => "internal error".into(),
        _ => e.to_string(),
    };
    WireError { code, message }
}

/// A batch of confirms: one store operation each, all submitted at once (the store commits them in a few
/// transactions), one result each.
async fn confirm_batch(shared: &Shared, gateway: &str, id: u64, confirms: Vec<ConfirmItem>) -> ResponseFrame {
    if confirms.is_empty() || confirms.len() > MAX_CONFIRM_BATCH {
        return ResponseFrame::err(id, ErrorCode::BadRequest, format!("confirms: 1 to {MAX_CONFIRM_BATCH}"));
    }
    let failed = |error: WireError| BatchResult {
        outcome: None,
        error: Some(error),
    };
    // All the batch's confirms go to the store as one call (one transaction, in order); a confirm whose terminal
    // fields are refused gets its error in its place.
    let mut results: Vec<Option<BatchResult>> = Vec::with_capacity(confirms.len());
    let mut ops = Vec::with_capacity(confirms.len());
    for c in confirms {
        match sale(gateway, c.terminal) {
            Ok(sale) => {
                results.push(None);
                ops.push(Op::Confirm {
                    holder: gateway.into(),
                    pin_id: c.pin_id,
                    sale,
                });
            }
            Err(message) => results.push(Some(failed(WireError {
                code: ErrorCode::BadRequest,
                message,
            }))),
        }
    }
    let outcomes = if ops.is_empty() {
        Vec::new()
    } else {
        let n = ops.len();
        // A store that cannot take the batch (shut down) fails each confirm, as each would have failed alone.
        shared.store.call_many(ops).await.unwrap_or_else(|e| {
            (0..n)
                .map(|_| Err(crate::store::StoreError::Db(e.to_string())))
                .collect()
        })
    };
    let mut outcomes = outcomes.into_iter();
    let results = results
        .into_iter()
        .map(|r| {
            if let Some(r) = r {
                return r;
            }
            match outcomes.next() {
                Some(Ok(Outcome::Confirmed(c))) => {
                    shared.count_confirmation(c);
                    BatchResult {
                        outcome: Some(c.into()),
                        error: None,
                    }
                }
                Some(Ok(_)) | None => failed(WireError {
                    code: ErrorCode::Internal,
                    message: "internal error".into(),
                }),
                Some(Err(e)) => {
                    let error = wire_error(&e);
                    if error.code == ErrorCode::Internal {
                        limited!(warn, "confirm failed", error = %e);
                    }
                    failed(error)
                }
            }
        })
        .collect();
    ResponseFrame::ok(id, Response::ConfirmedBatch { results })
}

async fn handle_request(shared: &Shared, gateway: &str, id: u64, request: Request) -> ResponseFrame {
    let request = match request {
        Request::ConfirmBatch { confirms } => return confirm_batch(shared, gateway, id, confirms).await,
        r => r,
    };
    let op = match to_op(shared, gateway, request) {
        Ok(Ok(op)) => op,
        Ok(Err(direct)) => return ResponseFrame::ok(id, direct),
        Err(msg) => return ResponseFrame::err(id, ErrorCode::BadRequest, msg),
    };
    let lease = match &op {
        Op::Reserve { lease_until, .. } | Op::Renew { lease_until, .. } => *lease_until,
        _ => 0,
    };
    match shared.store.call(op).await {
        Ok(outcome) => ResponseFrame::ok(
            id,
            match outcome {
                Outcome::Sold(d) => {
                    if d.redelivered {
                        shared.metrics.redeliveries.inc();
                    }
                    Response::Sold { pin: PinOut::from(d) }
                }
                Outcome::Reserved(v) => Response::Reserved {
                    pins: v.into_iter().map(PinOut::from).collect(),
                    lease_until: lease,
                },
                Outcome::Confirmed(c) => {
                    shared.count_confirmation(c);
                    Response::Confirmed { outcome: c.into() }
                }
                Outcome::Released { refused } => Response::Released { refused },
                Outcome::Renewed(count) => Response::Renewed {
                    count,
                    lease_until: lease,
                },
                Outcome::Reversed(r) => Response::from(r),
                Outcome::Stock(s) => Response::Stock {
                    stock: s.into_iter().map(StockEntry::from).collect(),
                },
                // Not operations a gateway can ask for (see `to_op`).
                Outcome::Catalog(_) | Outcome::Expired(_) | Outcome::Limits(..) => Response::Pong,
                Outcome::Held(pin_ids) => Response::Held { pin_ids },
                Outcome::SaleState(s) => Response::SaleState { state: s.into() },
                Outcome::Allowance { granted, limited } => Response::Allowance { granted, limited },
            },
        ),
        Err(e) => {
            let WireError { code, message } = wire_error(&e);
            if code == ErrorCode::Internal {
                limited!(warn, "request failed", error = %e);
            }
            ResponseFrame::err(id, code, message)
        }
    }
}

/// The store operation for a request, or an answer needing no store, or a bad-request message.
fn to_op(shared: &Shared, gateway: &str, request: Request) -> Result<Result<Op, Response>, String> {
    Ok(Ok(match request {
        Request::Hello { .. } => return Err("hello was already said".into()),
        Request::Ping => return Ok(Err(Response::Pong)),
        Request::Allowance {
            merchant_id,
            currency,
            amount,
        } => {
            if merchant_id.is_empty() || merchant_id.len() > crate::psp::MAX_MERCHANT_ID {
                return Err("merchant_id: 1 to 15 characters".into());
            }
            if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_digit()) {
                return Err("currency: ISO 4217 numeric, 3 digits".into());
            }
            if !(1..=1_000_000_000_000).contains(&amount) {
                return Err("amount: 1 to 1000000000000".into());
            }
            Op::Allowance {
                merchant_id,
                currency,
                want: amount,
            }
        }
        Request::SalesAllowance { merchant_id, count } => {
            if merchant_id.is_empty() || merchant_id.len() > crate::psp::MAX_MERCHANT_ID {
                return Err(format!("merchant_id: 1 to {} characters", crate::psp::MAX_MERCHANT_ID));
            }
            if !(1..=crate::psp::MAX_SALES_SLICE).contains(&count) {
                return Err(format!("count: 1 to {}", crate::psp::MAX_SALES_SLICE));
            }
            // The minute is this server's: a gateway's clock never decides which minute a grant counts in.
            Op::SalesAllowance {
                merchant_id,
                minute: unix_now().div_euclid(60),
                want: i64::from(count),
            }
        }
        Request::Sell {
            product,
            amount,
            terminal,
        } => Op::Sell(SellRequest {
            product,
            amount,
            sale: sale(gateway, terminal)?,
            repeat_since: unix_now() - shared.opts.repeat_age.as_secs() as i64,
        }),
        Request::Reserve {
            product,
            amount,
            count,
            lease_secs,
        } => {
            if count == 0 || count > MAX_RESERVE {
                return Err(format!("count: 1 to {MAX_RESERVE}"));
            }
            Op::Reserve {
                holder: gateway.into(),
                product,
                amount,
                count,
                lease_until: lease_until(shared, lease_secs)?,
            }
        }
        Request::ConfirmBatch { .. } => return Err("confirm_batch is handled on its own".into()),
        Request::Confirm { pin_id, terminal } => Op::Confirm {
            holder: gateway.into(),
            pin_id,
            sale: sale(gateway, terminal)?,
        },
        Request::Release { pin_ids } => {
            if pin_ids.len() > MAX_PIN_IDS {
                return Err(format!("pin_ids: at most {MAX_PIN_IDS}"));
            }
            Op::Release {
                holder: gateway.into(),
                pin_ids,
            }
        }
        Request::Renew { pin_ids, lease_secs } => {
            if pin_ids.len() > MAX_PIN_IDS {
                return Err(format!("pin_ids: at most {MAX_PIN_IDS}"));
            }
            Op::Renew {
                holder: gateway.into(),
                pin_ids,
                lease_until: lease_until(shared, lease_secs)?,
            }
        }
        Request::Reverse {
            terminal_id,
            stan,
            transmission,
            content,
            reason,
            requested_at,
        } => Op::Reverse {
            sale: sale(
                gateway,
                Terminal {
                    terminal_id,
                    merchant_id: content.as_ref().map_or("-", |c| &c.merchant_id).into(),
                    stan,
                    transmission,
                    rrn: String::new(),
                },
            )?,
            content,
            policy: crate::store::ReversePolicy {
                reason,
                requested_at,
                window_secs: shared.opts.reversal_window.map(|w| w.as_secs() as i64),
            },
        },
        Request::ReversePin { pin_id } => Op::ReversePin {
            gateway: gateway.into(),
            pin_id,
        },
        Request::CheckSale { terminal } => Op::CheckSale {
            sale: sale(gateway, terminal)?,
        },
        Request::Stock => Op::Stock,
        Request::Held => Op::Held { holder: gateway.into() },
    }))
}

impl From<Dispensed> for PinOut {
    fn from(d: Dispensed) -> PinOut {
        PinOut {
            pin_id: d.pin_id,
            product: d.product,
            amount: d.amount,
            pin: d.pin,
            serial: d.serial,
            expiry: d.expiry,
            receipt: d.receipt,
        }
    }
}

impl From<Product> for CatalogEntry {
    fn from(p: Product) -> CatalogEntry {
        CatalogEntry {
            code: p.code,
            name: p.name,
            supplier: p.supplier,
            currency: p.currency,
            denominations: p.denominations,
        }
    }
}

impl From<StockRow> for StockEntry {
    fn from(r: StockRow) -> StockEntry {
        StockEntry {
            product: r.product,
            amount: r.amount,
            state: r.state.as_str().into(),
            count: r.count,
        }
    }
}

impl From<Confirmation> for ConfirmOutcome {
    fn from(c: Confirmation) -> ConfirmOutcome {
        match c {
            Confirmation::Sold => ConfirmOutcome::Sold,
            Confirmation::AlreadyConfirmed => ConfirmOutcome::AlreadyConfirmed,
            Confirmation::Voided => ConfirmOutcome::Voided,
            Confirmation::Conflict { voided: true } => ConfirmOutcome::ConflictVoided,
            Confirmation::Conflict { voided: false } => ConfirmOutcome::Conflict,
        }
    }
}

impl From<crate::store::SaleState> for crate::psp::SaleState {
    fn from(s: crate::store::SaleState) -> crate::psp::SaleState {
        match s {
            crate::store::SaleState::Sold => crate::psp::SaleState::Sold,
            crate::store::SaleState::Reversed => crate::psp::SaleState::Reversed,
            crate::store::SaleState::Unknown => crate::psp::SaleState::Unknown,
        }
    }
}

impl From<Reversal> for Response {
    fn from(r: Reversal) -> Response {
        let (outcome, pin_id) = match r {
            Reversal::Voided { pin_id } => (ReverseOutcome::Voided, Some(pin_id)),
            Reversal::AlreadyVoided { pin_id } => (ReverseOutcome::AlreadyVoided, Some(pin_id)),
            Reversal::Remembered => (ReverseOutcome::Remembered, None),
        };
        Response::Reversed { outcome, pin_id }
    }
}

impl From<&StoreError> for ErrorCode {
    fn from(e: &StoreError) -> ErrorCode {
        match e {
            StoreError::OutOfStock { .. } => ErrorCode::OutOfStock,
            StoreError::UnknownProduct(_) => ErrorCode::UnknownProduct,
            StoreError::UnknownDenomination { .. } => ErrorCode::UnknownDenomination,
            StoreError::DuplicateMismatch { .. } => ErrorCode::DuplicateMismatch,
            StoreError::AlreadyReversed { .. } => ErrorCode::AlreadyReversed,
            StoreError::RepeatExpired { .. } => ErrorCode::RepeatExpired,
            StoreError::ReversalMismatch { .. } => ErrorCode::ReversalMismatch,
            StoreError::ReversalTooLate { .. } => ErrorCode::ReversalTooLate,
            StoreError::NotHolder { .. } => ErrorCode::NotHolder,
            StoreError::BadRequest(_) | StoreError::ImportRow { .. } => ErrorCode::BadRequest,
            StoreError::Crypto(_) | StoreError::Unreadable { .. } | StoreError::Db(_) => ErrorCode::Internal,
        }
    }
}
