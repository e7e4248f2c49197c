use tonic::{Request, Response, Status};

use super::{SharedApp, convert, status};
use crate::auth::Denial;
use crate::proto::{self, auth_service_server::AuthService};

pub struct AuthApi {
    pub app: SharedApp,
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    async fn verify_token(
        &self,
        request: Request<proto::VerifyTokenRequest>,
    ) -> Result<Response<proto::Claims>, Status> {
        match self.app.verify_token(&request.into_inner().token) {
            Ok(claims) => Ok(Response::new(convert::claims(&claims))),
            Err(e) => Err(status::of_denial(
                &Denial::Unauthenticated(e.to_string()),
                self.app.links(),
            )),
        }
    }

    async fn authorize(
        &self,
        request: Request<proto::AuthorizeRequest>,
    ) -> Result<Response<proto::AuthorizeResponse>, Status> {
        let request = convert::access_request(request.into_inner());
        let access = self
            .app
            .authorize(&request)
            .map_err(|e| status::of_error(&e, self.app.links()))?;
        Ok(Response::new(convert::access(
            access,
            self.app.links(),
            &request.resource,
        )))
    }
}
