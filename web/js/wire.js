// The server's JSON, read in one place. Every decoder below turns one payload of the API into
// the plain object the rest of the UI uses (camelCase names, nothing left to look up), and is
// preceded by a `// schema: NAME` line naming the component schema of /openapi.json it reads.
// A decoder reads only the top-level fields of its argument and hands nested objects to the
// decoder of their own schema, so that the contract test
// (clients/python/tests/test_contract.py) can check every field read here against the schema
// the marker names. No other module reads a field of the server's JSON.
//
// Values stay in the server's units (KID raw, not ×10³): a metric's `scale` says how to show
// them (see `shown`).

// ---------------------------------------------------------------------------------------
// Errors

/** `{code, message}` of an error answer, or null when the body is not one. */
// schema: ErrorBody
export function errorBody(b) {
  return b && b.error ? errorDetail(b.error) : null;
}

// schema: ErrorDetail
export function errorDetail(e) {
  return { code: e.code, message: e.message };
}

// ---------------------------------------------------------------------------------------
// Runs, snapshots, reconstructions

// schema: RunSummary
export function runSummary(r) {
  return {
    name: r.name,
    snapshots: r.snapshots,
    bytes: r.bytes,
    firstNimg: r.first_nimg ?? null,
    lastNimg: r.last_nimg ?? null,
    lastActivity: r.last_activity || r.created_at,
  };
}

/** `GET /runs`: a list of RunSummary. */
export function runList(list) {
  return list.map(runSummary);
}

// schema: RunDetail
export function runDetail(d) {
  return {
    run: run(d.run),
    snapshots: d.snapshots,
    bytes: d.bytes,
    lastNimg: d.last_nimg ?? null,
    reconstructions: d.reconstructions.map(reconstruction),
  };
}

// schema: Run
export function run(r) {
  return { description: r.description, metadata: r.metadata };
}

// schema: SnapshotRow
export function snapshotRow(s) {
  return { nimg: s.nimg, sigmaRel: s.sigma_rel };
}

/** `GET /runs/{run}/snapshots`: a list of SnapshotRow. */
export function snapshotList(list) {
  return list.map(snapshotRow);
}

/** Whether a reconstruction answer (202: ReconstructionPending from its status URL, or the
 *  ReconstructionView of `POST /reconstruct`, which has the same fields) is still running,
 *  and where to ask again. */
// schema: ReconstructionPending
export function reconstructionPending(r) {
  return { running: r.status === 'running', statusUrl: r.status_url };
}

/** A ready reconstruction. */
// schema: ReconstructionView
export function reconstruction(r) {
  return {
    sigmaRel: r.sigma_rel,
    gamma: r.gamma,
    nimg: r.nimg,
    dtype: r.dtype,
    byteSize: r.byte_size ?? null,
    digest: r.digest ?? null,
    weightsUrl: r.weights_url,
    fileName: r.file_name,
    report: qualityReport(r.report),
  };
}

/** The solver's quality report (`GET /runs/{run}/preview`, and each reconstruction's). */
// schema: QualityReport
export function qualityReport(r) {
  return {
    sigmaRel: r.sigma_rel,
    gamma: r.gamma,
    nimg: r.nimg,
    relativeError: r.relative_error,
    noiseGain: r.noise_gain,
    coefficientL1: r.coefficient_l1,
    conditionNumber: r.condition_number,
    inputCount: r.inputs ? r.inputs.length : null,
    usedSnapshots: r.used_snapshots,
    warnings: (r.warnings || []).map(qualityWarning),
  };
}

// schema: QualityWarning
export function qualityWarning(w) {
  return { code: w.code, message: w.message };
}

// ---------------------------------------------------------------------------------------
// Reference statistics

// schema: ReferenceList
export function referenceList(l) {
  return l.references.map(reference);
}

// schema: Reference
export function reference(r) {
  return { name: r.name, source: r.source, count: r.count, hasFeatures: r.has_features };
}

// ---------------------------------------------------------------------------------------
// Sweeps

// schema: SweepList
export function sweepList(l) {
  return l.sweeps.map(sweep);
}

/** A sweep. `metrics` lists what it computes, in order, each with how to show it. */
// schema: Sweep
export function sweep(s) {
  return {
    id: s.id,
    run: s.run,
    status: s.status,
    running: s.status === 'running' || s.status === 'queued',
    spec: sweepSpec(s.spec),
    metrics: s.metrics.map(metricInfo),
    // Sweeps with equal keys may share a chart (same reference, images, seeds); readable.
    comparisonKey: s.comparison_key,
    pointsTotal: s.points_total,
    pointsDone: s.points_done,
    imagesDone: s.images_done,
    imagesTotal: s.images_total,
    best: s.best.map(bestPoint),
    // Only in `GET /sweeps/{id}` (and creation answers), not in listings.
    points: (s.points || []).map(sweepPoint),
    workers: (s.workers || []).map(sweepWorker),
    failures: (s.failures || []).map(sweepFailure),
  };
}

/** What a sweep was asked for. `evaluator` is `builtin` (the server samples EDM2's network)
 *  or `external` (users' own workers evaluate its points). `steps` is the builtin sampler's;
 *  an external sweep's `sampler` is the user's own settings, any JSON object, kept as it is
 *  (`externalSampler`, null for builtin sweeps). A sweep with only user metrics samples no
 *  images through the server: `numImages` 0, `referenceName` null. */
// schema: SweepSpec
export function sweepSpec(s) {
  const external = s.evaluator === 'external';
  return {
    evaluator: s.evaluator,
    external,
    sigmaRels: s.sigma_rels,
    numImages: s.num_images,
    seedSets: s.seed_sets,
    steps: external ? null : samplerSettings(s.sampler).steps,
    externalSampler: external ? s.sampler : null,
    referenceName: s.reference_name ?? null,
    warnings: s.warnings || [],
  };
}

// schema: SamplerSettings
export function samplerSettings(s) {
  return { steps: s.steps };
}

/** How the server names and shows a metric: `metric` its name (`fid`, `kid`, or a user
 *  metric's such as `val_loss`), `kind` (`fid`, `kid` or `user`), `label` ("FID", the
 *  fallback's "FD (pixel projection, not FID)", a user metric's "validation loss"),
 *  `shortLabel`, `scale` (shown value = raw value × scale), `axisLabel` (e.g. "KID ×10³"),
 *  `lowerIsBetter` (a user metric's goal), `fallback`. */
// schema: MetricInfo
export function metricInfo(m) {
  return {
    metric: m.metric,
    kind: m.kind,
    label: m.label,
    shortLabel: m.short_label,
    scale: m.scale,
    axisLabel: m.axis_label,
    lowerIsBetter: m.lower_is_better,
    fallback: m.fallback,
  };
}

// schema: BestPoint
export function bestPoint(b) {
  return {
    metric: b.metric,
    idx: b.idx,
    sigmaRel: b.sigma_rel,
    nimg: b.nimg,
    value: b.value,
    errorBar: b.error_bar ?? null,
  };
}

/** A point of a sweep; `result` once it is done. */
// schema: SweepPoint
export function sweepPoint(p) {
  return {
    idx: p.idx,
    sigmaRel: p.sigma_rel,
    nimg: p.nimg,
    status: p.status,
    error: p.error ?? null,
    imagesDone: p.images_done,
    imagesTotal: p.images_total,
    gridUrl: p.grid_url ?? null,
    result: p.result ? pointResult(p.result) : null,
  };
}

/** A finished point's scores by metric name (every metric of its sweep: fid, kid and user
 *  metrics), who computed its Inception features (`server`, `client`, `mixed`; null without
 *  image metrics), and the seconds it took. */
// schema: PointResult
export function pointResult(r) {
  return {
    metrics: Object.fromEntries(Object.entries(r.metrics).map(([name, m]) => [name, metricResult(m)])),
    features: r.features ?? null,
    seconds: r.timings ? timings(r.timings) : null,
  };
}

/** One metric of a point: `value` (what to plot and rank) and `errorBar` (the half-height
 *  of the bar to draw, null for none), raw units. */
// schema: MetricResult
export function metricResult(m) {
  return { value: m.value, errorBar: m.error_bar ?? null };
}

/** Seconds a point took in all. */
// schema: Timings
export function timings(t) {
  return t.reconstruct_s + t.batches_s + t.metrics_s;
}

/** How long a builtin sweep would take (`GET /runs/{run}/sweep-estimate`): `seconds` in all
 *  and per point on one worker (null: nothing measured yet), `note` the server's words for
 *  what it was measured on (or why there is no number), `basis` the figures. */
// schema: SweepEstimate
export function sweepEstimate(e) {
  return {
    points: e.points,
    images: e.images,
    seconds: e.seconds ?? null,
    pointSeconds: e.point_seconds ?? null,
    basis: e.basis ? estimateBasis(e.basis) : null,
    note: e.note,
  };
}

// schema: EstimateBasis
export function estimateBasis(b) {
  return { run: b.run, sameRun: b.same_run, sweep: b.sweep, points: b.points, steps: b.steps, imagesPerS: b.images_per_s };
}

/** A lease on a point, held now: who (`worker`, the name it gave), which point, when it
 *  claimed it, its last heartbeat and when the lease runs out (RFC 3339 strings); `expired`:
 *  the lease ran out (the worker is presumably dead; another may claim the point). */
// schema: SweepWorker
export function sweepWorker(w) {
  return {
    worker: w.worker,
    idx: w.idx,
    sigmaRel: w.sigma_rel,
    nimg: w.nimg,
    claimedAt: w.claimed_at,
    heartbeatAt: w.heartbeat_at,
    expiresAt: w.expires_at,
    expired: w.expired,
  };
}

/** An attempt at a point that did not finish: `outcome` (`failed`: the evaluator gave up, with
 *  its `message`; `expired`: its lease ran out, no message; `released`: given back), who and
 *  when. */
// schema: SweepFailure
export function sweepFailure(f) {
  return {
    worker: f.worker,
    idx: f.idx,
    sigmaRel: f.sigma_rel,
    nimg: f.nimg,
    claimedAt: f.claimed_at,
    endedAt: f.ended_at ?? null,
    outcome: f.outcome,
    message: f.message ?? null,
  };
}

// ---------------------------------------------------------------------------------------
// Helpers over the decoded objects (no server field below this line)

/** A raw value as people read it (KID ×10³): the metric's scale applied. */
export function shown(info, v) {
  return v === null || v === undefined ? v : v * info.scale;
}

/** The point's score by `metric` ({value, errorBar}), or null. (A user metric may be named
 *  like an Object property, `constructor`: only the map's own entries count.) */
export function pointMetric(p, metric) {
  return p.result && Object.hasOwn(p.result.metrics, metric) ? p.result.metrics[metric] : null;
}

/** How `sweep` shows `metric` (its MetricInfo). */
export function metricOf(sweep, metric) {
  return sweep.metrics.find((m) => m.metric === metric);
}
