//! The request bodies of the ingress API, as `deny_unknown_fields` serde
//! types, so a misspelt field is a 400 naming it.

use grabflow_api::Id;
use grabflow_http::extract::IdSchema;
use serde::Deserialize;
use utoipa::ToSchema;

/// A position in WGS84 degrees.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LatLon {
    /// Latitude, −90 to 90.
    #[schema(minimum = -90.0, maximum = 90.0)]
    pub lat: f64,
    /// Longitude, −180 to 180.
    #[schema(minimum = -180.0, maximum = 180.0)]
    pub lon: f64,
}

/// `PUT /v1/merchants/{merchant_id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MerchantBody {
    /// Latitude, −90 to 90.
    #[schema(minimum = -90.0, maximum = 90.0)]
    pub lat: f64,
    /// Longitude, −180 to 180.
    #[schema(minimum = -180.0, maximum = 180.0)]
    pub lon: f64,
    /// Whether it takes orders (default true).
    #[serde(default = "yes")]
    pub open: bool,
}

fn yes() -> bool {
    true
}

/// `PUT /v1/riders/{rider_id}/shift`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShiftBody {
    /// On shift or not.
    pub online: bool,
    /// Orders the rider may carry at once (1–50); the server default if absent.
    #[schema(minimum = 1, maximum = 50)]
    pub capacity: Option<u32>,
}

/// `POST /v1/riders/{rider_id}/location`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LocationBody {
    /// Latitude, −90 to 90.
    #[schema(minimum = -90.0, maximum = 90.0)]
    pub lat: f64,
    /// Longitude, −180 to 180.
    #[schema(minimum = -180.0, maximum = 180.0)]
    pub lon: f64,
    /// The device's clock, ms (informational; the log assigns event time).
    pub at: Option<u64>,
}

/// One item of `POST /v1/locations:batch`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchPing {
    /// The rider (validated as it is parsed: a batch is thousands of these).
    #[schema(value_type = IdSchema)]
    pub rider_id: Id,
    /// Latitude, −90 to 90.
    #[schema(minimum = -90.0, maximum = 90.0)]
    pub lat: f64,
    /// Longitude, −180 to 180.
    #[schema(minimum = -180.0, maximum = 180.0)]
    pub lon: f64,
    /// The device's clock, ms.
    pub at: Option<u64>,
}

/// `POST /v1/orders`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderBody {
    /// The order's id.
    #[schema(value_type = IdSchema)]
    pub order_id: String,
    /// The merchant preparing it.
    #[schema(value_type = IdSchema)]
    pub merchant_id: String,
    /// Where it goes.
    pub dropoff: LatLon,
    /// Promised delivery time, minutes (1–1440, default 30).
    #[serde(default = "thirty")]
    #[schema(minimum = 1, maximum = 1440, default = 30)]
    pub promised_minutes: u32,
}

fn thirty() -> u32 {
    30
}

/// `POST /v1/orders/{order_id}/cancel`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    /// Why (kept with the request log only).
    pub reason: Option<String>,
}

/// A body that must be empty or `{}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmptyBody {}

/// `POST /v1/orders/{order_id}/compensation`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompensationBody {
    /// What was paid, cents (1 to 10 000 000).
    #[schema(minimum = 1, maximum = 10_000_000)]
    pub amount_cents: u64,
}

/// `POST /v1/ops/orders/{order_id}/reassign`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReassignBody {
    /// The rider to give the order to.
    #[schema(value_type = IdSchema)]
    pub rider_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use grabflow_http::extract::{coord, id, parse};

    #[test]
    fn malformed_bodies_name_the_field() {
        let e = parse::<OrderBody>(
            br#"{"order_id":"o","merchant_id":"m","dropoff":{"lat":1,"lon":2,"x":3}}"#,
        )
        .unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("unknown_field", Some("dropoff.x"))
        );
        let e = parse::<LocationBody>(br#"{"lat":1,"lon":2,"x":3}"#).unwrap_err();
        assert_eq!((e.code, e.field.as_deref()), ("unknown_field", Some("x")));
        let e = parse::<OrderBody>(br#"{"order_id":"o","merchant_id":"m"}"#).unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("invalid_field", Some("dropoff"))
        );
        let e = parse::<LocationBody>(br#"{"lat":"north","lon":2}"#).unwrap_err();
        assert_eq!((e.code, e.field.as_deref()), ("invalid_field", Some("lat")));
        let e = parse::<LocationBody>(br#"{"lat":1,"#).unwrap_err();
        assert_eq!(e.code, "invalid_json");
        assert_eq!(
            coord(91.0, 0.0, "dropoff").unwrap_err().field.as_deref(),
            Some("dropoff.lat")
        );
        assert_eq!(
            id("a b", "rider_id").unwrap_err().field.as_deref(),
            Some("rider_id")
        );
    }

    /// What a parser may answer for a bad body: a 4xx naming it, never a panic.
    fn well_formed<T: serde::de::DeserializeOwned>(bytes: &[u8]) {
        if let Err(e) = parse::<T>(bytes) {
            assert!(
                ["invalid_json", "unknown_field", "invalid_field"].contains(&e.code),
                "{}",
                e.code
            );
            assert!(e.status.is_client_error());
        }
    }

    /// Every body parser, on one input.
    fn every_body(bytes: &[u8]) {
        well_formed::<MerchantBody>(bytes);
        well_formed::<ShiftBody>(bytes);
        well_formed::<LocationBody>(bytes);
        well_formed::<Vec<BatchPing>>(bytes);
        well_formed::<OrderBody>(bytes);
        well_formed::<CancelBody>(bytes);
        well_formed::<EmptyBody>(bytes);
        well_formed::<CompensationBody>(bytes);
        well_formed::<ReassignBody>(bytes);
    }

    /// JSON values of every shape, with the bodies' field names likely.
    fn json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        use serde_json::Value;
        let name = prop_oneof![
            Just("lat".to_string()),
            Just("lon".to_string()),
            Just("rider_id".to_string()),
            Just("order_id".to_string()),
            Just("merchant_id".to_string()),
            Just("dropoff".to_string()),
            Just("amount_cents".to_string()),
            Just("online".to_string()),
            Just("capacity".to_string()),
            "[a-z_]{0,12}",
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "\\PC{0,16}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                proptest::collection::btree_map(name.clone(), inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(2_000))]

        #[test]
        fn any_bytes_get_a_4xx_never_a_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            every_body(&bytes);
        }

        #[test]
        fn any_json_gets_a_4xx_never_a_panic(value in json()) {
            every_body(&serde_json::to_vec(&value).unwrap());
        }
    }
}
