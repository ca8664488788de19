//! The WGSL kernel family: shader assembly, the shared bind group layout, and the pipeline
//! cache. One source family (shaders/), specialized per measure and input kind through
//! pipeline-overridable constants; compiled once per engine, on first use.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::types::{Dtype, Input, Measure};

// Status flags raised by the kernels (status[0]). An invalid element raises FLAG_INVALID and
// records its position; the host reads the value there to say what is wrong with it.
pub(crate) const FLAG_INVALID: u32 = 1;
pub(crate) const FLAG_P_EMPTY: u32 = 64;
pub(crate) const FLAG_Q_EMPTY: u32 = 128;
pub(crate) const FLAG_SUBGROUP_LAYOUT: u32 = 256;
// A row's result or normalizing sum left f32's range. No position is recorded (an invalid
// element elsewhere keeps its record); the row reads NaN, which is how the host finds it.
pub(crate) const FLAG_OVERFLOW: u32 = 512;
// status[3] once a dispatch has run: Workspace::check tells a recording that was never
// submitted from one whose input was valid.
pub(crate) const RAN_MARK: u32 = 1;
// Dispatch modes: the MODE constant each pipeline is specialized for (shaders/common.wgsl).
pub(crate) const MODE_PARTIAL: u32 = 1;
pub(crate) const MODE_ACCUMULATE: u32 = 2;
pub(crate) const MODE_KEEP: u32 = 4;
pub(crate) const MODE_STATS: u32 = 8;
/// Subtract 1 from the residual when finishing (the loss kernel's Σt − 1).
pub(crate) const MODE_MINUS_ONE: u32 = 16;
/// Leave the rows the one-pass KL kernel finished alone (`row_done` in shaders/common.wgsl).
pub(crate) const MODE_SKIP_DONE: u32 = 32;
/// Leave alone also the rows whose log-sum-exps it wrote (the log-sum-exp pass).
pub(crate) const MODE_SKIP_READY: u32 = 64;

/// What a terms dispatch sums: one of the four measures, or the plain sums used for
/// normalization and for the roofline benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Term {
    Measure(Measure),
    /// Σp and Σq of a row.
    Sums,
    /// Σp alone, compensated, not validated.
    SumP,
    /// Σp as a plain f32 sum, not validated: one streaming read, the bandwidth roofline.
    RoofP,
    /// Σp + Σq the same way: the roofline of a two-input kernel over the same bytes.
    RoofPQ,
    /// The loss KL(P‖softmax(z)) with z bound as P and the target as Q; writes the gradient.
    KlGrad,
    /// KL's term of plain probabilities without validation, summed in plain f32: a benchmark
    /// diagnostic, between the roofline and KL.
    KlBare,
}

impl Term {
    fn code(self) -> u32 {
        match self {
            Term::Measure(Measure::KullbackLeibler) => 0,
            Term::Measure(Measure::CrossEntropy) => 1,
            Term::Measure(Measure::Entropy) => 2,
            Term::Measure(Measure::JensenShannon) => 3,
            Term::Sums => 4,
            Term::SumP => 5,
            Term::RoofPQ => 6,
            Term::KlGrad => 7,
            Term::RoofP => 8,
            Term::KlBare => 9,
        }
    }

    pub(crate) fn uses_q(self) -> bool {
        match self {
            Term::Measure(m) => m.uses_q(),
            Term::Sums | Term::RoofPQ | Term::KlGrad | Term::KlBare => true,
            Term::SumP | Term::RoofP => false,
        }
    }
}

/// How the terms kernel reads its inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum InputCode {
    Probs,
    LogProbs,
    Logits,
    /// Probabilities scaled by the reciprocal row sums found by a `Term::Sums` pre-pass.
    ProbsNormalized,
}

impl InputCode {
    pub(crate) fn of(input: Input, normalize: bool) -> Self {
        match input {
            Input::Probs if normalize => InputCode::ProbsNormalized,
            Input::Probs => InputCode::Probs,
            Input::LogProbs => InputCode::LogProbs,
            Input::Logits => InputCode::Logits,
        }
    }

    fn code(self) -> u32 {
        match self {
            InputCode::Probs => 0,
            InputCode::LogProbs => 1,
            InputCode::Logits => 2,
            InputCode::ProbsNormalized => 3,
        }
    }
}

/// The entry points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Stage {
    Terms,
    Combine,
    Lse,
    CombineLse,
    /// Cross-entropy or entropy of logits or normalized probabilities in one pass
    /// (shaders/kernels_soft.wgsl).
    Soft,
    CombineSoft,
    /// KL of logits in one pass, for the rows it can finish (shaders/kernels_rel.wgsl).
    Rel,
    CombineRel,
    /// KL or JS of normalized probabilities in one pass, for the rows it can finish
    /// (shaders/kernels_norm.wgsl).
    Norm,
    CombineNorm,
}

impl Stage {
    /// The entry point's name in the module of [`Stage::monoid`] (shaders/entries.wgsl).
    fn entry(self) -> &'static str {
        match self {
            Stage::Terms => "element_pass_Acc",
            Stage::Combine => "combine_pass_Acc",
            Stage::Lse => "element_pass_Lse",
            Stage::CombineLse => "combine_pass_Lse",
            Stage::Soft => "element_pass_Soft",
            Stage::CombineSoft => "combine_pass_Soft",
            Stage::Rel => "element_pass_Rel",
            Stage::CombineRel => "combine_pass_Rel",
            Stage::Norm => "element_pass_Norm",
            Stage::CombineNorm => "combine_pass_Norm",
        }
    }

    fn monoid(self) -> &'static str {
        match self {
            Stage::Terms | Stage::Combine => "Acc",
            Stage::Lse | Stage::CombineLse => "Lse",
            Stage::Soft | Stage::CombineSoft => "Soft",
            Stage::Rel | Stage::CombineRel => "Rel",
            Stage::Norm | Stage::CombineNorm => "Norm",
        }
    }
}

/// The per-dispatch uniform block; mirrors `Params` in shaders/common.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Params {
    pub shift_p: u32,
    pub shift_q: u32,
    pub row_len: u32,
    pub rows: u32,
    pub col_begin: u32,
    pub col_end: u32,
    pub chunk_len: u32,
    pub chunks: u32,
    pub lanes: u32,
    pub out_base: u32,
    pub window_id: u32,
    pub subgroup_width: u32,
    pub out_scale: f32,
    pub agree_base: u32,
    pub grad_base: u32,
    /// Columns per lane when each lane walks a contiguous block; 0 when lanes interleave.
    pub lane_span: u32,
    /// Always 0. The shaders select on it to keep a compiler from simplifying TwoSum's error
    /// term away (Mesa's NIR turns (a + b) − a into b; see `opaque` in common.wgsl).
    pub zero: u32,
    /// Elements per row of the window's inputs: where an empty row's first column is, also in
    /// the combine pass, whose `row_len` is its partials' stride.
    pub elem_row_len: u32,
    pub _pad: [u32; 2],
}

/// Size of `RowStats` in the shaders (six 4-byte words), the per-row statistics.
pub(crate) const MONOID_BYTES: u64 = 24;
/// Room for the largest partial a dispatch writes: `Rel` (sixteen words; `Lse` has twelve,
/// `Norm` eleven, `Soft` eight, `Acc` seven). The reductions' shared memory holds one state
/// per invocation: 16 KiB for 256, wgpu's default limit (`unmet_limits` asks for it where
/// `Tuning::one_pass_kl` is on).
pub(crate) const PARTIAL_BYTES: u64 = 64;
/// The largest state without `Rel` (`Lse`'s twelve words): every other kernel's shared memory.
pub(crate) const STATE_BYTES_WITHOUT_REL: u64 = 48;

/// The lines after `//---- NAME` in a WGSL file, up to the next such marker: the files hold
/// the alternative forms of one piece side by side.
fn section<'a>(source: &'a str, name: &str) -> &'a str {
    let marker = format!("//---- {name}\n");
    let start = source.find(&marker).map_or(0, |i| i + marker.len());
    let rest = &source[start..];
    &rest[..rest.find("//---- ").unwrap_or(rest.len())]
}

/// One of the two loops in shaders/loops.wgsl, for the terms (`Acc`), log-sum-exp (`Lse`),
/// one-pass logits (`Soft`), one-pass KL of logits (`Rel`) or of normalized probabilities
/// (`Norm`) kernel.
fn element_loop(monoid: &str, vec4: bool) -> String {
    let loops = include_str!("../shaders/loops.wgsl");
    let body = section(loops, if vec4 { "LOOP_VEC4" } else { "LOOP_SCALAR" });
    let [element, fold4, fold, ctx] = match monoid {
        "Acc" => ["element", "fold4_term", "fold_term", "ctx"],
        "Lse" => ["lse_element", "fold4_lse", "combine_Lse", "0u"],
        "Rel" => ["rel_element", "rel_fold4", "rel_fold", "0u"],
        "Norm" => ["norm_element", "norm_fold4", "norm_fold", "0u"],
        _ => ["soft_element", "soft_fold4", "soft_fold", "0u"],
    };
    body.replace("FOLD4", fold4)
        .replace("ELEMENT", element)
        .replace("FOLD", fold)
        .replace("CTX", ctx)
}

/// How a kernel reduces the lanes of each segment. Each is a module of its own: a barrier
/// anywhere in a shader costs llvmpipe coroutines for every invocation, taken or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum SegmentReduce {
    /// One lane per segment: nothing to reduce, no barrier, no shared memory.
    OneLane,
    /// Segments no wider than a subgroup: a subgroup butterfly alone, no barrier, no shared
    /// memory.
    SubgroupOnly,
    /// A tree in shared memory.
    SharedMemory,
    /// A subgroup butterfly, then the tree for what is left.
    Subgroups,
}

impl SegmentReduce {
    /// The variant for a dispatch with `lanes` lanes per segment; `subgroup_width` is the
    /// adapter's smallest subgroup when subgroups are in use, else `None`.
    pub(crate) fn for_lanes(lanes: u32, subgroup_width: Option<u32>) -> SegmentReduce {
        match subgroup_width {
            _ if lanes == 1 => SegmentReduce::OneLane,
            Some(width) if lanes <= width => SegmentReduce::SubgroupOnly,
            Some(_) => SegmentReduce::Subgroups,
            None => SegmentReduce::SharedMemory,
        }
    }

    /// Whether the module uses subgroup operations.
    fn subgroups(self) -> bool {
        matches!(self, SegmentReduce::SubgroupOnly | SegmentReduce::Subgroups)
    }
}

/// The input bindings and loads for a storage type and load width (shaders/elements.wgsl);
/// the wide ones add `load4_edge`, the masked vec4 at a segment's ends.
fn element_loads(dtype: Dtype, vec4: bool) -> String {
    let source = include_str!("../shaders/elements.wgsl");
    let width = if vec4 { "WIDE" } else { "SCALAR" };
    let mut parts = match dtype {
        Dtype::F32 => vec![section(source, &format!("F32_{width}"))],
        Dtype::F16 | Dtype::BF16 => {
            let widen = if dtype == Dtype::F16 { "F16" } else { "BF16" };
            vec![
                section(source, &format!("HALF_{width}")),
                section(source, widen),
            ]
        }
    };
    if vec4 {
        parts.push(section(source, "EDGE4"));
    }
    parts.join("\n")
}

/// Full WGSL source of one module: constants, common header, monoid, reduction, kernels.
/// `vec4` selects wide input loads (groups of four elements; the terms and log-sum-exp loops
/// only), `dtype` how the inputs are stored.
/// `quick` turns on the quick path of the terms loop (shaders/kernels_sum.wgsl), which votes
/// with `subgroupAll`: only for devices with subgroups. `workgroup_size` is the module's `WG`.
pub(crate) fn shader_source(
    monoid: &str,
    reduce: SegmentReduce,
    vec4: bool,
    quick: bool,
    dtype: Dtype,
    workgroup_size: u32,
) -> String {
    let subgroups = reduce.subgroups();
    let quick_all = if quick { "subgroupAll(v)" } else { "false" };
    let constants = format!(
        "const WG: u32 = {workgroup_size}u;\n\
         const FLAG_INVALID: u32 = {FLAG_INVALID}u;\nconst FLAG_P_EMPTY: u32 = {FLAG_P_EMPTY}u;\n\
         const FLAG_Q_EMPTY: u32 = {FLAG_Q_EMPTY}u;\n\
         const FLAG_SUBGROUP_LAYOUT: u32 = {FLAG_SUBGROUP_LAYOUT}u;\n\
         const FLAG_OVERFLOW: u32 = {FLAG_OVERFLOW}u;\nconst RAN_MARK: u32 = {RAN_MARK}u;\n\
         const MODE_PARTIAL: u32 = {MODE_PARTIAL}u;\nconst MODE_ACCUMULATE: u32 = {MODE_ACCUMULATE}u;\n\
         const MODE_KEEP: u32 = {MODE_KEEP}u;\nconst MODE_STATS: u32 = {MODE_STATS}u;\n\
         const MODE_MINUS_ONE: u32 = {MODE_MINUS_ONE}u;\n\
         const MODE_SKIP_DONE: u32 = {MODE_SKIP_DONE}u;\n\
         const MODE_SKIP_READY: u32 = {MODE_SKIP_READY}u;\n\
         const ACC_INF: u32 = 1u;\n\
         const MEASURE_KL: u32 = 0u;\nconst MEASURE_CE: u32 = 1u;\nconst MEASURE_ENTROPY: u32 = 2u;\n\
         const MEASURE_JS: u32 = 3u;\nconst MEASURE_SUM: u32 = 4u;\nconst MEASURE_SUM_P: u32 = 5u;\n\
         const MEASURE_ROOF_PQ: u32 = 6u;\nconst MEASURE_KL_GRAD: u32 = 7u;\n\
         const MEASURE_ROOF_P: u32 = 8u;\nconst MEASURE_KL_BARE: u32 = 9u;\n\
         const INPUT_PROBS: u32 = 0u;\nconst INPUT_LOGPROBS: u32 = 1u;\nconst INPUT_LOGITS: u32 = 2u;\n\
         const INPUT_PROBS_NORM: u32 = 3u;\n\
         const QUICK: bool = {quick};\nfn quick_all(v: bool) -> bool {{ return {quick_all}; }}\n"
    );
    let stage = if subgroups {
        include_str!("../shaders/subgroup_stage.wgsl")
    } else {
        ""
    };
    let reduce = section(
        include_str!("../shaders/reduce.wgsl"),
        match reduce {
            SegmentReduce::OneLane => "ONE_LANE",
            SegmentReduce::SubgroupOnly => "SUBGROUP_ONLY",
            SegmentReduce::SharedMemory | SegmentReduce::Subgroups => "TREE",
        },
    )
    .replace("//SUBGROUP_STAGE_MONOID", stage)
    .replace("MONOID", monoid);
    let kernels = match monoid {
        "Acc" => concat!(
            include_str!("../shaders/terms.wgsl"),
            include_str!("../shaders/kernels_sum.wgsl")
        ),
        "Soft" => concat!(
            include_str!("../shaders/terms.wgsl"),
            include_str!("../shaders/kernels_soft.wgsl")
        ),
        "Rel" => concat!(
            include_str!("../shaders/terms.wgsl"),
            include_str!("../shaders/kernels_rel.wgsl")
        ),
        "Norm" => concat!(
            include_str!("../shaders/terms.wgsl"),
            include_str!("../shaders/kernels_norm.wgsl")
        ),
        _ => concat!(
            include_str!("../shaders/terms.wgsl"),
            include_str!("../shaders/kernels_lse.wgsl")
        ),
    };
    let (sg_params, sg_value) = if subgroups {
        (
            ", @builtin(subgroup_size) sg_size: u32, @builtin(subgroup_invocation_id) sg_lane: u32",
            "vec2<u32>(sg_size, sg_lane)",
        )
    } else {
        ("", "vec2<u32>(0u, 0u)")
    };
    // Only the terms kernels have per-row constants (ctx, see row_ctx), and a gradient to
    // write for the segment's own columns (own_cols).
    let row_ctx = if monoid == "Acc" {
        "let ctx = row_ctx(row);\n        own_cols = vec2<u32>(c0, c1);"
    } else {
        ""
    };
    let entries = include_str!("../shaders/entries.wgsl")
        .replace("//ROW_CTX", row_ctx)
        .replace("//LOOP", &element_loop(monoid, vec4))
        .replace("MONOID", monoid);
    let kernels = [kernels, entries.as_str()]
        .join("\n")
        .replace("/*SG_PARAMS*/", sg_params)
        .replace("SG_VALUE", sg_value);
    let common = include_str!("../shaders/common.wgsl");
    let monoids = include_str!("../shaders/monoids.wgsl");
    let shuffle = if subgroups {
        shuffle_xor_source(monoid, &[common, monoids].join("\n"))
    } else {
        String::new()
    };
    let loads = element_loads(dtype, vec4);
    [
        constants.as_str(),
        common,
        &loads,
        monoids,
        &shuffle,
        &reduce,
        &kernels,
    ]
    .join("\n")
}

/// `shuffle_xor_MONOID`, the subgroup shuffle of a monoid's state (only with
/// `Features::SUBGROUP`): every field of its struct, as `source` declares it, through
/// `subgroupShuffleXor`, so that a field added to a state is never left out of the butterfly.
fn shuffle_xor_source(monoid: &str, source: &str) -> String {
    let head = format!("struct {monoid} {{");
    let body = source
        .split_once(&head)
        .and_then(|(_, rest)| rest.split_once('}'))
        .map(|(body, _)| body)
        .unwrap_or_else(|| panic!("the shaders declare no struct {monoid}"));
    let fields: Vec<String> = body
        .lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .flat_map(|line| line.split(','))
        .filter_map(|field| field.split_once(':'))
        .map(|(name, _)| format!("subgroupShuffleXor(a.{}, mask)", name.trim()))
        .collect();
    format!(
        "fn shuffle_xor_{monoid}(a: {monoid}, mask: u32) -> {monoid} {{\n    return {monoid}({});\n}}\n",
        fields.join(", ")
    )
}

/// How a module's element loops read P and Q: the storage type, and whether four elements at
/// a time (see `wide_loads` in launch.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Loads {
    pub dtype: Dtype,
    pub wide: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PipelineKey {
    stage: Stage,
    term: u32,
    input: u32,
    mode: u32,
    reduce: SegmentReduce,
    loads: Loads,
    workgroup_size: u32,
}

/// What a module's source depends on: the monoid, the reduction, the loads and the workgroup
/// size (pipelines add the stage's entry point and the MEASURE, INPUT and MODE constants).
type ModuleKey = (&'static str, SegmentReduce, Loads, u32);

/// Bind group layout, modules and compiled pipelines of one device.
pub(crate) struct Kernels {
    pub layout: wgpu::BindGroupLayout,
    pipeline_layout: wgpu::PipelineLayout,
    modules: Mutex<HashMap<ModuleKey, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<PipelineKey, wgpu::ComputePipeline>>,
    /// Whether the terms loop has its quick path ([`Tuning::quick_vec4`](crate::Tuning)).
    quick: bool,
}

fn storage(binding: u32, read_only: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

impl Kernels {
    /// `quick` needs a device with `Features::SUBGROUP`.
    pub(crate) fn new(device: &wgpu::Device, quick: bool) -> Kernels {
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: true,
                min_binding_size: wgpu::BufferSize::new(std::mem::size_of::<Params>() as u64),
            },
            count: None,
        }];
        entries.push(storage(1, true));
        entries.push(storage(2, true));
        entries.extend((3..=8).map(|b| storage(b, false)));
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("klgpu.bind_group_layout"),
            entries: &entries,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("klgpu.pipeline_layout"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        Kernels {
            layout,
            pipeline_layout,
            modules: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
            quick,
        }
    }

    /// The pipeline for a stage, its `MODE_` flags and workgroup size, compiled on first use
    /// and cached.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn pipeline(
        &self,
        device: &wgpu::Device,
        stage: Stage,
        term: Term,
        input: InputCode,
        mode: u32,
        reduce: SegmentReduce,
        loads: Loads,
        workgroup_size: u32,
    ) -> wgpu::ComputePipeline {
        // Only the element loops read the inputs: the combine passes share one module.
        let loops = matches!(
            stage,
            Stage::Terms | Stage::Lse | Stage::Soft | Stage::Rel | Stage::Norm
        );
        let loads = if loops {
            loads
        } else {
            Loads {
                dtype: Dtype::F32,
                wide: false,
            }
        };
        let key = PipelineKey {
            stage,
            term: term.code(),
            input: input.code(),
            mode,
            reduce,
            loads,
            workgroup_size,
        };
        let Loads { dtype, wide } = loads;
        // Compiled outside the lock: held, every thread's call waited for one thread's compile
        // (on llvmpipe, a tenth of a second to seconds), also for pipelines long cached. Two
        // threads may compile the same one; the first kept is used.
        if let Some(p) = self
            .pipelines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return p.clone();
        }
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            modules
                .entry((stage.monoid(), reduce, loads, workgroup_size))
                .or_insert_with(|| {
                    device.create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(match stage.monoid() {
                            "Acc" => "klgpu.sums",
                            "Lse" => "klgpu.lse",
                            "Rel" => "klgpu.rel",
                            "Norm" => "klgpu.norm",
                            _ => "klgpu.soft",
                        }),
                        source: wgpu::ShaderSource::Wgsl(
                            shader_source(
                                stage.monoid(),
                                reduce,
                                wide,
                                self.quick,
                                dtype,
                                workgroup_size,
                            )
                            .into(),
                        ),
                    })
                })
                .clone()
        };
        let width = if wide { "wide" } else { "scalar" };
        let label = format!(
            "klgpu.{}.{:?}.{:?}.mode{mode}.{}.{width}.wg{workgroup_size}",
            stage.entry(),
            term,
            input,
            dtype.name()
        );
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: Some(&self.pipeline_layout),
            module: &module,
            entry_point: Some(stage.entry()),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &[
                    ("MEASURE", key.term as f64),
                    ("INPUT", key.input as f64),
                    ("MODE", mode as f64),
                ],
                ..Default::default()
            },
            cache: None,
        });
        self.pipelines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_insert(pipeline)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_match_the_wgsl_struct_size() {
        assert_eq!(std::mem::size_of::<Params>(), 80);
    }

    #[test]
    fn a_shuffle_moves_every_field_of_its_state() {
        let source = "struct Two {\n    a: f32, // a comment: with a colon, and a comma\n    b_i: u32,\n}\n\
                      struct Norm { x: f32, y: vec2<f32> }";
        assert_eq!(
            shuffle_xor_source("Two", source),
            "fn shuffle_xor_Two(a: Two, mask: u32) -> Two {\n    return Two(subgroupShuffleXor(a.a, mask), \
             subgroupShuffleXor(a.b_i, mask));\n}\n"
        );
        // The shaders' own states: as many shuffles as fields (naga's validation below checks
        // the constructor's arity and types).
        let shaders = [
            include_str!("../shaders/common.wgsl"),
            include_str!("../shaders/monoids.wgsl"),
        ]
        .join("\n");
        for (monoid, fields) in [
            ("Acc", 7),
            ("Lse", 12),
            ("Soft", 8),
            ("Rel", 16),
            ("Norm", 11),
        ] {
            let shuffle = shuffle_xor_source(monoid, &shaders);
            assert_eq!(
                shuffle.matches("subgroupShuffleXor(a.").count(),
                fields,
                "{shuffle}"
            );
            // The partials and the shared memory the limits ask for hold it (4-byte fields).
            let room = if monoid == "Rel" {
                PARTIAL_BYTES
            } else {
                STATE_BYTES_WITHOUT_REL
            };
            assert!(4 * fields as u64 <= room, "{monoid}");
        }
        assert_eq!((PARTIAL_BYTES, STATE_BYTES_WITHOUT_REL), (4 * 16, 4 * 12));
    }

    #[test]
    fn every_module_variant_parses_and_validates() {
        use SegmentReduce::*;
        for monoid in ["Acc", "Lse", "Soft", "Rel", "Norm"] {
            for reduce in [OneLane, SubgroupOnly, SharedMemory, Subgroups] {
                let widths = [(false, false), (true, false), (true, true)];
                for (((vec4, quick), dtype), wg) in widths
                    .into_iter()
                    .flat_map(|w| [Dtype::F32, Dtype::F16, Dtype::BF16].map(|d| (w, d)))
                    .flat_map(|v| [crate::plan::WORKGROUP_SIZE, 32, 8].map(|wg| (v, wg)))
                {
                    let src = shader_source(monoid, reduce, vec4, quick, dtype, wg);
                    let what =
                        format!("{monoid}/{reduce:?}/vec4={vec4}/quick={quick}/{dtype:?}/wg={wg}");
                    let module = naga::front::wgsl::parse_str(&src)
                        .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&src)));
                    let mut validator = naga::valid::Validator::new(
                        naga::valid::ValidationFlags::all(),
                        naga::valid::Capabilities::all(),
                    );
                    validator
                        .validate(&module)
                        .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&src)));
                    // The point of the one-lane and subgroup-only variants: no barrier, no
                    // shared memory.
                    let tree = matches!(reduce, SharedMemory | Subgroups);
                    assert_eq!(src.contains("workgroupBarrier"), tree, "{what}");
                    assert_eq!(src.contains("var<workgroup>"), tree, "{what}");
                    assert_eq!(
                        src.contains("subgroupShuffleXor"),
                        reduce.subgroups(),
                        "{what}"
                    );
                }
            }
        }
    }
}
