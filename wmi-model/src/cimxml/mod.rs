//! CIM-XML (DSP0201) over HTTP (DSP0200): reading requests, writing responses and export
//! (indication) requests.

pub mod dom;
mod request;
mod response;

pub use request::{
    Arg, ArgValue, Call, IParam, ProtocolError, Request, parse_instance, parse_request,
};
pub use response::{
    IReturn, MethodOutput, OutValue, export_indication, imethod_response, method_response,
};
