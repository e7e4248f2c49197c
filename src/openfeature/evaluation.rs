//! `flagd.evaluation.v1.Service` and `flagd.evaluation.v2.Service` over the flag cache.

use prost_types::Struct;
use tonic::{Request, Response, Status};

use super::{
    Resolved, as_bool, as_float, as_int, as_object, as_string, events, resolve, tenant_of,
};
use crate::api::{ResponseStream, SharedApp};
use crate::flagd_proto::evaluation::{v1, v2};
use crate::flags::FlagValue;

/// One evaluator behind both protocol versions.
#[derive(Clone)]
pub struct Evaluation {
    pub app: SharedApp,
}

impl Evaluation {
    fn resolve(&self, key: &str, context: Option<&Struct>) -> Result<Resolved, Status> {
        let tenant = tenant_of(context, &self.app.config.openfeature_tenant_attribute)?;
        Ok(resolve(&self.app.feeds.flags, tenant.as_deref(), key)?)
    }
}

#[tonic::async_trait]
impl v2::service_server::Service for Evaluation {
    async fn resolve_boolean(
        &self,
        request: Request<v2::ResolveBooleanRequest>,
    ) -> Result<Response<v2::ResolveBooleanResponse>, Status> {
        let request = request.into_inner();
        let resolved = self.resolve(&request.flag_key, request.context.as_ref())?;
        Ok(Response::new(v2::ResolveBooleanResponse {
            value: Some(as_bool(&request.flag_key, &resolved.value)?),
            reason: resolved.reason.into(),
            variant: Some(resolved.variant.into()),
            metadata: None,
        }))
    }

    async fn resolve_string(
        &self,
        request: Request<v2::ResolveStringRequest>,
    ) -> Result<Response<v2::ResolveStringResponse>, Status> {
        let request = request.into_inner();
        let resolved = self.resolve(&request.flag_key, request.context.as_ref())?;
        Ok(Response::new(v2::ResolveStringResponse {
            value: Some(as_string(&request.flag_key, resolved.value)?),
            reason: resolved.reason.into(),
            variant: Some(resolved.variant.into()),
            metadata: None,
        }))
    }

    async fn resolve_float(
        &self,
        request: Request<v2::ResolveFloatRequest>,
    ) -> Result<Response<v2::ResolveFloatResponse>, Status> {
        let request = request.into_inner();
        let resolved = self.resolve(&request.flag_key, request.context.as_ref())?;
        Ok(Response::new(v2::ResolveFloatResponse {
            value: Some(as_float(&request.flag_key, &resolved.value)?),
            reason: resolved.reason.into(),
            variant: Some(resolved.variant.into()),
            metadata: None,
        }))
    }

    async fn resolve_int(
        &self,
        request: Request<v2::ResolveIntRequest>,
    ) -> Result<Response<v2::ResolveIntResponse>, Status> {
        let request = request.into_inner();
        let resolved = self.resolve(&request.flag_key, request.context.as_ref())?;
        Ok(Response::new(v2::ResolveIntResponse {
            value: Some(as_int(&request.flag_key, &resolved.value)?),
            reason: resolved.reason.into(),
            variant: Some(resolved.variant.into()),
            metadata: None,
        }))
    }

    async fn resolve_object(
        &self,
        request: Request<v2::ResolveObjectRequest>,
    ) -> Result<Response<v2::ResolveObjectResponse>, Status> {
        let request = request.into_inner();
        let resolved = self.resolve(&request.flag_key, request.context.as_ref())?;
        Ok(Response::new(v2::ResolveObjectResponse {
            value: Some(as_object(&request.flag_key, resolved.value)?),
            reason: resolved.reason.into(),
            variant: Some(resolved.variant.into()),
            metadata: None,
        }))
    }

    type EventStreamStream = ResponseStream<v2::EventStreamResponse>;

    async fn event_stream(
        &self,
        _request: Request<v2::EventStreamRequest>,
    ) -> Result<Response<Self::EventStreamStream>, Status> {
        events::stream(&self.app, |kind, data| v2::EventStreamResponse {
            r#type: kind.into(),
            data: Some(data),
        })
        .map(Response::new)
    }
}

#[tonic::async_trait]
impl v1::service_server::Service for Evaluation {
    async fn resolve_all(
        &self,
        request: Request<v1::ResolveAllRequest>,
    ) -> Result<Response<v1::ResolveAllResponse>, Status> {
        let request = request.into_inner();
        let tenant = tenant_of(
            request.context.as_ref(),
            &self.app.config.openfeature_tenant_attribute,
        )?;
        let cache = &self.app.feeds.flags;
        let flags = cache
            .all_of(tenant.as_deref().unwrap_or(""))
            .into_iter()
            .filter_map(|flag| {
                let key = flag.key().to_owned();
                let resolved = Resolved::from(flag);
                let value = match resolved.value {
                    FlagValue::Bool(b) => v1::any_flag::Value::BoolValue(b),
                    FlagValue::String(s) => v1::any_flag::Value::StringValue(s),
                    FlagValue::Number(n) => v1::any_flag::Value::DoubleValue(n),
                    json @ FlagValue::Json(_) => {
                        // Only objects have a slot in AnyFlag; other JSON is left out.
                        v1::any_flag::Value::ObjectValue(as_object(&key, json).ok()?)
                    }
                };
                Some((
                    key,
                    v1::AnyFlag {
                        reason: resolved.reason.into(),
                        variant: resolved.variant.into(),
                        value: Some(value),
                        metadata: None,
                    },
                ))
            })
            .collect();
        Ok(Response::new(v1::ResolveAllResponse {
            flags,
            metadata: None,
        }))
    }

    async fn resolve_boolean(
        &self,
        request: Request<v1::ResolveBooleanRequest>,
    ) -> Result<Response<v1::ResolveBooleanResponse>, Status> {
        let request = request.into_inner();
        let resolved = self.resolve(&request.flag_key, request.context.as_ref())?;
        Ok(Response::new(v1::ResolveBooleanResponse {
            value: as_bool(&request.flag_key, &resolved.value)?,
            reason: resolved.reason.into(),
            variant: resolved.variant.into(),
            metadata: None,
        }))
    }

    async fn resolve_string(
        &self,
        request: Request<v1::ResolveStringRequest>,
    ) -> Result<Response<v1::ResolveStringResponse>, Status> {
        let request = request.into_inner();
        let resolved = self.resolve(&request.flag_key, request.context.as_ref())?;
        Ok(Response::new(v1::ResolveStringResponse {
            value: as_string(&request.flag_key, resolved.value)?,
            reason: resolved.reason.into(),
            variant: resolved.variant.into(),
            metadata: None,
        }))
    }

    async fn resolve_float(
        &self,
        request: Request<v1::ResolveFloatRequest>,
    ) -> Result<Response<v1::ResolveFloatResponse>, Status> {
        let request = request.into_inner();
        let resolved = self.resolve(&request.flag_key, request.context.as_ref())?;
        Ok(Response::new(v1::ResolveFloatResponse {
            value: as_float(&request.flag_key, &resolved.value)?,
            reason: resolved.reason.into(),
            variant: resolved.variant.into(),
            metadata: None,
        }))
    }

    async fn resolve_int(
        &self,
        request: Request<v1::ResolveIntRequest>,
    ) -> Result<Response<v1::ResolveIntResponse>, Status> {
        let request = request.into_inner();
        let resolved = self.resolve(&request.flag_key, request.context.as_ref())?;
        Ok(Response::new(v1::ResolveIntResponse {
            value: as_int(&request.flag_key, &resolved.value)?,
            reason: resolved.reason.into(),
            variant: resolved.variant.into(),
            metadata: None,
        }))
    }

    async fn resolve_object(
        &self,
        request: Request<v1::ResolveObjectRequest>,
    ) -> Result<Response<v1::ResolveObjectResponse>, Status> {
        let request = request.into_inner();
        let resolved = self.resolve(&request.flag_key, request.context.as_ref())?;
        Ok(Response::new(v1::ResolveObjectResponse {
            value: Some(as_object(&request.flag_key, resolved.value)?),
            reason: resolved.reason.into(),
            variant: resolved.variant.into(),
            metadata: None,
        }))
    }

    type EventStreamStream = ResponseStream<v1::EventStreamResponse>;

    async fn event_stream(
        &self,
        _request: Request<v1::EventStreamRequest>,
    ) -> Result<Response<Self::EventStreamStream>, Status> {
        events::stream(&self.app, |kind, data| v1::EventStreamResponse {
            r#type: kind.into(),
            data: Some(data),
        })
        .map(Response::new)
    }
}
