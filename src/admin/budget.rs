//! SHOW BUDGET (Floodgate's own; PgBouncer has no equivalent): per upstream host, the
//! connection budget shared by the live instances (`instances = "auto"`) and this instance's
//! part of it. Empty when `instances` is a number.

use bytes::BytesMut;

use super::table::{Kind, NULL, Table, int, text};
use crate::shared::Shared;

use Kind::{Int, Text};

const COLUMNS: [(&str, Kind); 12] = [
    ("host", Text),
    ("instance_id", Text),
    ("max_connections", Int),
    ("superuser_reserved", Int),
    ("budget", Int),
    ("instances", Int),
    ("share", Int),
    ("cap", Int),
    ("in_use", Int),
    ("claim", Int),
    ("others_claim", Int),
    ("last_error", Text),
];

pub fn show(shared: &Shared, out: &mut BytesMut) {
    let mut t = Table::new(out, &COLUMNS);
    if let Some(budget) = &shared.pools.budget {
        for host in budget.hosts() {
            let v = host.view();
            // Before the first poll nothing is known of the server: NULL, not zero.
            let known = |n: i64| if v.polled { int(n) } else { NULL };
            t.row(vec![
                text(&host.addr),
                text(&budget.id),
                known(v.max_connections),
                known(v.superuser_reserved),
                known(v.budget as i64),
                known(v.instances as i64),
                known(v.share as i64),
                int(host.cap.max() as i64),
                int(host.cap.in_use() as i64),
                int(v.claim as i64),
                known(v.others_claim as i64),
                text(v.error.unwrap_or_default()),
            ]);
        }
    }
    t.finish();
}
