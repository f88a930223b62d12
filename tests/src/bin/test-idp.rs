//! The test identity provider as a process (for the demo): speaks the Entra
//! ID v2 token endpoint for the client-credentials grant. Test support only.

fn main() {}
