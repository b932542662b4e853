//! The gRPC codec of the `ps.v1` API: prost's encoding, with the buffer
//! sized once per message.
//!
//! tonic encodes a message into a buffer that starts at 8 KiB and doubles
//! as it fills, so a pull answer or a push of a few megabytes is copied
//! through eight or nine reallocations before it is sent. The encoder here
//! reserves the message's encoded length first (prost computes it without
//! encoding), so the message is written once, where it will be sent from.
//! Decoding is prost's own: tonic already reserves a message's length from
//! its frame header before it arrives.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic_prost::ProstDecoder;

/// The codec the generated `ps.v1` clients and servers use (set in
/// `build.rs`): encodes `T`, decodes `U`.
#[derive(Debug, Clone, Copy)]
pub struct ReservingCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for ReservingCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for ReservingCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ReservingEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ReservingEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::default()
    }
}

/// Encodes a `T` into a buffer grown to its whole length first.
#[derive(Debug, Clone, Copy)]
pub struct ReservingEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for ReservingEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf)
            .map_err(|e| Status::internal(format!("cannot encode a message: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{PullResponse, PushRequest};
    use http_body_util::BodyExt;
    use tonic::codec::EncodeBody;
    use tonic::codegen::tokio_stream;

    /// The bytes a client sends for `message`, through tonic's own body.
    fn sent<T: Message + Default + Clone + Send + 'static>(message: &T) -> bytes::Bytes {
        let encoder = ReservingCodec::<T, T>::default().encoder();
        let body = EncodeBody::new_client(
            encoder,
            tokio_stream::iter([Ok(message.clone())]),
            None,
            None,
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        runtime
            .block_on(body.collect())
            .expect("encodes")
            .to_bytes()
    }

    fn assert_prost_framed<
        T: Message + Default + Clone + PartialEq + std::fmt::Debug + Send + 'static,
    >(
        message: T,
    ) {
        let bytes = sent(&message);
        let len = message.encoded_len();
        assert_eq!(bytes.len(), 5 + len, "a gRPC frame header and the message");
        assert_eq!(bytes[0], 0, "not compressed");
        assert_eq!(&bytes[1..5], (len as u32).to_be_bytes());
        assert_eq!(&bytes[5..], message.encode_to_vec(), "prost's bytes");
        assert_eq!(T::decode(&bytes[5..]).expect("decodes"), message);
    }

    #[test]
    fn a_pull_answer_of_megabytes_is_prost_s_encoding_in_one_frame() {
        assert_prost_framed(PullResponse {
            dim: 16,
            values: bytes::Bytes::from(vec![7u8; 25_000 * 64]),
            ..Default::default()
        });
    }

    #[test]
    fn a_push_with_keys_and_gradients_is_prost_s_encoding() {
        assert_prost_framed(PushRequest {
            table: "embeddings".into(),
            keys: (0..25_000u64).map(|k| k * 7919).collect(),
            gradients: bytes::Bytes::from(vec![1u8; 25_000 * 64]),
            lr_scale: Some(0.5),
            writer: 3,
            seq: 9,
            ..Default::default()
        });
    }

    #[test]
    fn an_empty_message_is_an_empty_frame() {
        assert_prost_framed(PullResponse::default());
    }
}
