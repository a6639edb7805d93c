//! The gateway service's codec: prost's, except that a request prost cannot decode is the
//! caller's error (INVALID_ARGUMENT, naming where decoding failed) rather than INTERNAL.
//!
//! gRPC's status table says INTERNAL for a message that does not parse, which is right between
//! trusted peers; here it told a bot that sent a struct nested deeper than prost's recursion
//! limit that the gateway was broken. Owns only that mapping; sizes are `limits`' business.

use std::marker::PhantomData;

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// [`ProstCodec`] with [`GatewayDecoder`].
#[derive(Debug, Clone)]
pub struct GatewayCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for GatewayCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for GatewayCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = GatewayDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        GatewayDecoder(ProstCodec::<T, U>::raw_decoder(BufferSettings::default()))
    }
}

/// Decodes with prost; a failure is INVALID_ARGUMENT.
#[derive(Debug)]
pub struct GatewayDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for GatewayDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|e| {
            // prost's text is `failed to decode Protobuf message: <path>: <reason>`, where the
            // path (`Message.value: Value.kind: ListValue.values: …`) may be hundreds of steps
            // long: the reason first, then the start of the path.
            let text = e.message();
            let text = text
                .strip_prefix("failed to decode Protobuf message: ")
                .unwrap_or(text);
            let (path, reason) = text.rsplit_once(": ").unwrap_or(("", text));
            Status::invalid_argument(format!(
                "request could not be decoded: {} (at {})",
                crate::bounded::cap(reason, 256),
                crate::bounded::cap(path, 256)
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
