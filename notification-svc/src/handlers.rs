//! One handler per event type consumed (DESIGN.md §5, docs/SAGA.md). Events that carry
//! data for later mails are kept in the consumer's transaction; events that call for
//! mail plan one per recipient and hand them to the [`Notifier`].

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Value, json};
use shared::events::{
    Event, OrderCancelled, OrderCreated, OrderLine, OrderPaid, ProductCreated, ProductDeleted,
    ProductUpdated, ReviewCreated, UserRegistered,
};
use shared::messaging::{Envelope, Handler, HandlerError};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::{cancellation_reason, money};
use crate::notify::{Mail, Notifier, Plan};
use crate::store::{self, Contact};

/// Every handler of the service.
pub fn all(notifier: Arc<Notifier>) -> Vec<Arc<dyn Handler>> {
    vec![
        Arc::new(Welcome(notifier.clone())),
        Arc::new(KeepProduct),
        Arc::new(UpdateProduct),
        Arc::new(DeleteProduct),
        Arc::new(KeepOrder),
        Arc::new(MailReceipts(notifier.clone())),
        Arc::new(MailCancellation(notifier.clone())),
        Arc::new(MailReview(notifier)),
    ]
}

fn data<T: Event>(event: &Envelope) -> Result<T, HandlerError> {
    Ok(event.data_as::<T>()?)
}

fn person(contact: &Contact) -> Value {
    json!({"name": contact.name, "email": contact.email})
}

fn mail(contact: &Contact, template: &'static str, context: Value) -> Plan {
    Plan::Send(Mail {
        recipient_id: contact.user_id,
        to_email: contact.email.clone(),
        to_name: contact.name.clone(),
        template,
        context,
    })
}

fn no_contact(recipient_id: Uuid, template: &'static str) -> Plan {
    Plan::Missing {
        recipient_id,
        template,
        what: format!("no contact for user {recipient_id} yet (user.registered not received)"),
    }
}

/// Lines as the templates show them; `Err` names the products not known yet.
fn lines_view(lines: &[&OrderLine], names: &HashMap<Uuid, String>) -> Result<Vec<Value>, String> {
    let missing: BTreeSet<Uuid> = lines
        .iter()
        .map(|l| l.product_id)
        .filter(|id| !names.contains_key(id))
        .collect();
    if !missing.is_empty() {
        let ids: Vec<String> = missing.iter().map(ToString::to_string).collect();
        return Err(format!(
            "product {} not known yet (product.created not received)",
            ids.join(", ")
        ));
    }
    Ok(lines
        .iter()
        .map(|l| {
            let total = l.unit_price_cents.saturating_mul(l.quantity);
            json!({
                "product_id": l.product_id,
                "product_name": names.get(&l.product_id),
                "quantity": l.quantity,
                "unit_price": money(l.unit_price_cents),
                "unit_price_cents": l.unit_price_cents,
                "line_total": money(total),
                "line_total_cents": total,
            })
        })
        .collect())
}

fn order_view(order_id: Uuid, total_cents: i64, currency: &str) -> Value {
    json!({"id": order_id, "total": money(total_cents), "total_cents": total_cents,
           "currency": currency})
}

struct Welcome(Arc<Notifier>);

#[async_trait]
impl Handler for Welcome {
    fn event_type(&self) -> &'static str {
        UserRegistered::TYPE
    }

    fn name(&self) -> &'static str {
        "welcome"
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let user: UserRegistered = data(event)?;
        store::save_contact(tx, &user).await?;
        let roles: Vec<&str> = user.roles.iter().map(|r| r.as_str()).collect();
        let contact = Contact {
            user_id: user.user_id,
            email: user.email.clone(),
            name: user.name.clone(),
        };
        let context = json!({"name": user.name, "email": user.email, "roles": roles});
        self.0
            .deliver(
                event,
                user.user_id,
                vec![mail(&contact, "welcome", context)],
            )
            .await
    }
}

struct KeepProduct;

#[async_trait]
impl Handler for KeepProduct {
    fn event_type(&self) -> &'static str {
        ProductCreated::TYPE
    }

    fn name(&self) -> &'static str {
        "keep_product"
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let p: ProductCreated = data(event)?;
        let changed =
            store::save_product(tx, p.product_id, p.seller_id, &p.name, p.created_at).await?;
        tracing::info!(product_id = %p.product_id, changed, "product.created");
        Ok(())
    }
}

struct UpdateProduct;

#[async_trait]
impl Handler for UpdateProduct {
    fn event_type(&self) -> &'static str {
        ProductUpdated::TYPE
    }

    fn name(&self) -> &'static str {
        "update_product"
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let p: ProductUpdated = data(event)?;
        let changed =
            store::save_product(tx, p.product_id, p.seller_id, &p.name, p.updated_at).await?;
        // Not changed: an older update than the one kept arrived late.
        tracing::info!(product_id = %p.product_id, changed, "product.updated");
        Ok(())
    }
}

struct DeleteProduct;

#[async_trait]
impl Handler for DeleteProduct {
    fn event_type(&self) -> &'static str {
        ProductDeleted::TYPE
    }

    fn name(&self) -> &'static str {
        "delete_product"
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let p: ProductDeleted = data(event)?;
        store::delete_product(tx, &p).await?;
        Ok(())
    }
}

struct KeepOrder;

#[async_trait]
impl Handler for KeepOrder {
    fn event_type(&self) -> &'static str {
        OrderCreated::TYPE
    }

    fn name(&self) -> &'static str {
        "keep_order"
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let order: OrderCreated = data(event)?;
        store::save_order(tx, &order).await?;
        Ok(())
    }
}

/// order.paid: a receipt to the customer and, to each seller, a notice with only that
/// seller's lines.
struct MailReceipts(Arc<Notifier>);

#[async_trait]
impl Handler for MailReceipts {
    fn event_type(&self) -> &'static str {
        OrderPaid::TYPE
    }

    fn name(&self) -> &'static str {
        "mail_receipts"
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let paid: OrderPaid = data(event)?;
        let product_ids: Vec<Uuid> = paid.lines.iter().map(|l| l.product_id).collect();
        let names = store::product_names(tx, &product_ids).await?;
        // Sellers in the order their first line appears, each once.
        let mut sellers: Vec<Uuid> = Vec::new();
        for line in &paid.lines {
            if !sellers.contains(&line.seller_id) {
                sellers.push(line.seller_id);
            }
        }
        let mut people = sellers.clone();
        people.push(paid.customer_id);
        let contacts = store::contacts(tx, &people).await?;
        let order = order_view(paid.order_id, paid.total_cents, &paid.currency);

        let mut plans = Vec::new();
        let all: Vec<&OrderLine> = paid.lines.iter().collect();
        plans.push(
            match (contacts.get(&paid.customer_id), lines_view(&all, &names)) {
                (None, _) => no_contact(paid.customer_id, "order_receipt"),
                (Some(_), Err(what)) => Plan::Missing {
                    recipient_id: paid.customer_id,
                    template: "order_receipt",
                    what,
                },
                (Some(customer), Ok(lines)) => mail(
                    customer,
                    "order_receipt",
                    json!({"customer": person(customer), "order": order, "lines": lines}),
                ),
            },
        );
        for seller_id in sellers {
            let theirs: Vec<&OrderLine> = paid
                .lines
                .iter()
                .filter(|l| l.seller_id == seller_id)
                .collect();
            let subtotal: i64 = theirs
                .iter()
                .map(|l| l.unit_price_cents.saturating_mul(l.quantity))
                .fold(0, i64::saturating_add);
            plans.push(
                match (contacts.get(&seller_id), lines_view(&theirs, &names)) {
                    (None, _) => no_contact(seller_id, "seller_order_notice"),
                    (Some(_), Err(what)) => Plan::Missing {
                        recipient_id: seller_id,
                        template: "seller_order_notice",
                        what,
                    },
                    (Some(seller), Ok(lines)) => mail(
                        seller,
                        "seller_order_notice",
                        json!({"seller": person(seller), "order": order, "lines": lines,
                               "subtotal": money(subtotal), "subtotal_cents": subtotal}),
                    ),
                },
            );
        }
        self.0.deliver(event, paid.order_id, plans).await
    }
}

/// order.cancelled: the customer learns why, with the order's lines as placed.
struct MailCancellation(Arc<Notifier>);

#[async_trait]
impl Handler for MailCancellation {
    fn event_type(&self) -> &'static str {
        OrderCancelled::TYPE
    }

    fn name(&self) -> &'static str {
        "mail_cancellation"
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let cancelled: OrderCancelled = data(event)?;
        const TEMPLATE: &str = "order_cancelled";
        let customer_id = cancelled.customer_id;
        let contacts = store::contacts(tx, &[customer_id]).await?;
        let plan = match (
            contacts.get(&customer_id),
            store::order(tx, cancelled.order_id).await?,
        ) {
            (None, _) => no_contact(customer_id, TEMPLATE),
            (Some(_), None) => Plan::Missing {
                recipient_id: customer_id,
                template: TEMPLATE,
                what: format!(
                    "order {} not known yet (order.created not received)",
                    cancelled.order_id
                ),
            },
            (Some(customer), Some(order)) => {
                let ids: Vec<Uuid> = order.lines.iter().map(|l| l.product_id).collect();
                let names = store::product_names(tx, &ids).await?;
                let all: Vec<&OrderLine> = order.lines.iter().collect();
                match lines_view(&all, &names) {
                    Err(what) => Plan::Missing {
                        recipient_id: customer_id,
                        template: TEMPLATE,
                        what,
                    },
                    Ok(lines) => mail(
                        customer,
                        TEMPLATE,
                        json!({
                            "customer": person(customer),
                            "order": order_view(order.order_id, order.total_cents, &order.currency),
                            "lines": lines,
                            "reason": cancelled.reason,
                            "reason_text": cancellation_reason(&cancelled.reason),
                        }),
                    ),
                }
            }
        };
        self.0.deliver(event, cancelled.order_id, vec![plan]).await
    }
}

/// review.created: the product's seller hears of it.
struct MailReview(Arc<Notifier>);

#[async_trait]
impl Handler for MailReview {
    fn event_type(&self) -> &'static str {
        ReviewCreated::TYPE
    }

    fn name(&self) -> &'static str {
        "mail_review"
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let review: ReviewCreated = data(event)?;
        const TEMPLATE: &str = "review_created";
        let contacts = store::contacts(tx, &[review.seller_id]).await?;
        let plan = match contacts.get(&review.seller_id) {
            None => no_contact(review.seller_id, TEMPLATE),
            Some(seller) => {
                let rating = usize::try_from(review.rating.clamp(1, 5)).unwrap_or(1);
                let stars = format!("{}{}", "★".repeat(rating), "☆".repeat(5 - rating));
                mail(
                    seller,
                    TEMPLATE,
                    json!({
                        "seller": person(seller),
                        "product": {"id": review.product_id, "name": review.product_name},
                        "review": {"id": review.review_id, "rating": review.rating,
                                   "stars": stars, "body": review.body},
                    }),
                )
            }
        };
        self.0.deliver(event, review.review_id, vec![plan]).await
    }
}
