//! The control room: the API `lbd` and `lbctl` speak ([`api`], newline-delimited JSON over a
//! Unix socket), both ends of the socket ([`server`], [`client`]), and lbd's journal of what
//! happened to it ([`events`]), which `lbctl status` shows.
mod api;
mod client;
pub mod events;
pub mod round;
mod server;

pub use api::*;
pub use client::{Client, ClientError};
pub use server::{group_id, ControlSocket, Handler, Peer};
