//! The OpenAPI document, generated from the handlers' annotations (utoipa).

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{blobs, error, meta, reconstruct, runs, sweeps, views};

/// The API description served at `GET /openapi.json`.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "hindsight",
        description = "Post-hoc EMA of neural-network weights (EDM2, arXiv 2312.02696): \
                       reconstruct any EMA length from stored snapshots."
    ),
    paths(
        reconstruct::post_reconstruct,
        reconstruct::get_reconstruction,
        reconstruct::get_weights,
        runs::list_runs,
        runs::get_run,
        runs::list_snapshots,
        runs::upload_snapshot,
        runs::delete_snapshot,
        runs::preview,
        runs::profiles,
        sweeps::post_sweep,
        sweeps::list_sweeps,
        sweeps::get_sweep,
        sweeps::delete_sweep,
        sweeps::sweep_events,
        sweeps::sweep_plot,
        sweeps::point_grid,
        sweeps::list_references,
        sweeps::get_reference,
        sweeps::reference_npz,
        sweeps::post_reference,
        blobs::head_blob,
        meta::healthz,
        openapi_json,
    ),
    components(schemas(
        reconstruct::ReconstructRequest,
        reconstruct::Widths,
        views::ReconstructionView,
        views::ReconstructionList,
        views::RunDetail,
        views::RunSummaryView,
        views::RunView,
        views::SnapshotView,
        views::ManifestEntryView,
        views::IngestedView,
        views::DeletedSnapshotView,
        views::DtypeView,
        views::sweeps::SweepRequestBody,
        views::sweeps::SamplerBody,
        views::sweeps::Nimgs,
        views::sweeps::ReferenceKey,
        views::sweeps::SweepView,
        views::sweeps::SweepList,
        views::sweeps::PointView,
        views::sweeps::BestPoint,
        views::sweeps::ReferenceView,
        views::sweeps::ReferenceList,
        error::ErrorBody,
        error::ErrorDetail,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "reconstructions", description = "Reconstruct and download EMA weights"),
        (name = "runs", description = "Training runs"),
        (name = "snapshots", description = "Stored EMA snapshots and uploads"),
        (name = "sweeps", description = "FID/KID of reconstructions over EMA lengths: the curve"),
        (name = "references", description = "Reference statistics of image sets for the metrics"),
        (name = "meta", description = "Health and this document"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)))]
pub(super) async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
