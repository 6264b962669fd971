from google.protobuf import struct_pb2 as _struct_pb2
from vitlens.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputGrid(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_GRID_UNSPECIFIED: _ClassVar[OutputGrid]
    OUTPUT_GRID_INPUT: _ClassVar[OutputGrid]
    OUTPUT_GRID_TOKENS: _ClassVar[OutputGrid]

class Task(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_UNSPECIFIED: _ClassVar[Task]
    TASK_CLASSIFICATION: _ClassVar[Task]
    TASK_IMAGE_TEXT_SIMILARITY: _ClassVar[Task]
    TASK_VISUAL_QUESTION_ANSWERING: _ClassVar[Task]
    TASK_OBJECT_DETECTION: _ClassVar[Task]
OUTPUT_GRID_UNSPECIFIED: OutputGrid
OUTPUT_GRID_INPUT: OutputGrid
OUTPUT_GRID_TOKENS: OutputGrid
TASK_UNSPECIFIED: Task
TASK_CLASSIFICATION: Task
TASK_IMAGE_TEXT_SIMILARITY: Task
TASK_VISUAL_QUESTION_ANSWERING: Task
TASK_OBJECT_DETECTION: Task

class ExplainRequest(_message.Message):
    __slots__ = ("model", "method", "images", "target", "options", "texts", "questions", "regions", "detection")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    DETECTION_FIELD_NUMBER: _ClassVar[int]
    model: str
    method: str
    images: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Image]
    target: Target
    options: ExplainOptions
    texts: _containers.RepeatedScalarFieldContainer[str]
    questions: _containers.RepeatedScalarFieldContainer[str]
    regions: _containers.RepeatedCompositeFieldContainer[Regions]
    detection: DetectionOptions
    def __init__(self, model: _Optional[str] = ..., method: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_tensor_pb2.Image, _Mapping]]] = ..., target: _Optional[_Union[Target, _Mapping]] = ..., options: _Optional[_Union[ExplainOptions, _Mapping]] = ..., texts: _Optional[_Iterable[str]] = ..., questions: _Optional[_Iterable[str]] = ..., regions: _Optional[_Iterable[_Union[Regions, _Mapping]]] = ..., detection: _Optional[_Union[DetectionOptions, _Mapping]] = ...) -> None: ...

class DetectionOptions(_message.Message):
    __slots__ = ("threshold", "max_detections", "queries")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    threshold: float
    max_detections: int
    queries: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, threshold: _Optional[float] = ..., max_detections: _Optional[int] = ..., queries: _Optional[_Iterable[int]] = ...) -> None: ...

class Regions(_message.Message):
    __slots__ = ("features", "boxes")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    features: _tensor_pb2.Tensor
    boxes: _tensor_pb2.Tensor
    def __init__(self, features: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., boxes: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class Target(_message.Message):
    __slots__ = ("predicted", "class_index", "per_image", "top_k")
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    predicted: bool
    class_index: int
    per_image: ClassIndices
    top_k: int
    def __init__(self, predicted: _Optional[bool] = ..., class_index: _Optional[int] = ..., per_image: _Optional[_Union[ClassIndices, _Mapping]] = ..., top_k: _Optional[int] = ...) -> None: ...

class ClassIndices(_message.Message):
    __slots__ = ("indices",)
    INDICES_FIELD_NUMBER: _ClassVar[int]
    indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, indices: _Optional[_Iterable[int]] = ...) -> None: ...

class ExplainOptions(_message.Message):
    __slots__ = ("grid", "return_relevance", "output_dtype", "top_k_predictions", "method_options")
    GRID_FIELD_NUMBER: _ClassVar[int]
    RETURN_RELEVANCE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    METHOD_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    grid: OutputGrid
    return_relevance: bool
    output_dtype: _tensor_pb2.Dtype
    top_k_predictions: int
    method_options: _struct_pb2.Struct
    def __init__(self, grid: _Optional[_Union[OutputGrid, str]] = ..., return_relevance: _Optional[bool] = ..., output_dtype: _Optional[_Union[_tensor_pb2.Dtype, str]] = ..., top_k_predictions: _Optional[int] = ..., method_options: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("model", "method", "results", "timing")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    model: str
    method: str
    results: _containers.RepeatedCompositeFieldContainer[ImageExplanation]
    timing: Timing
    def __init__(self, model: _Optional[str] = ..., method: _Optional[str] = ..., results: _Optional[_Iterable[_Union[ImageExplanation, _Mapping]]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class ImageExplanation(_message.Message):
    __slots__ = ("id", "predictions", "explanations", "detections")
    ID_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    EXPLANATIONS_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    id: str
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    explanations: _containers.RepeatedCompositeFieldContainer[Explanation]
    detections: _containers.RepeatedCompositeFieldContainer[Detection]
    def __init__(self, id: _Optional[str] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., explanations: _Optional[_Iterable[_Union[Explanation, _Mapping]]] = ..., detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("target", "heatmap", "relevance", "text", "region_relevance", "matrices")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_FIELD_NUMBER: _ClassVar[int]
    RELEVANCE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    REGION_RELEVANCE_FIELD_NUMBER: _ClassVar[int]
    MATRICES_FIELD_NUMBER: _ClassVar[int]
    target: Prediction
    heatmap: _tensor_pb2.Tensor
    relevance: _tensor_pb2.Tensor
    text: TextRelevance
    region_relevance: _containers.RepeatedScalarFieldContainer[float]
    matrices: _containers.RepeatedCompositeFieldContainer[RelevanceMatrix]
    def __init__(self, target: _Optional[_Union[Prediction, _Mapping]] = ..., heatmap: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., relevance: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., text: _Optional[_Union[TextRelevance, _Mapping]] = ..., region_relevance: _Optional[_Iterable[float]] = ..., matrices: _Optional[_Iterable[_Union[RelevanceMatrix, _Mapping]]] = ...) -> None: ...

class Detection(_message.Message):
    __slots__ = ("query", "prediction", "box", "heatmap", "query_relevance")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_FIELD_NUMBER: _ClassVar[int]
    QUERY_RELEVANCE_FIELD_NUMBER: _ClassVar[int]
    query: int
    prediction: Prediction
    box: Box
    heatmap: _tensor_pb2.Tensor
    query_relevance: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, query: _Optional[int] = ..., prediction: _Optional[_Union[Prediction, _Mapping]] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., heatmap: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., query_relevance: _Optional[_Iterable[float]] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ...) -> None: ...

class RelevanceMatrix(_message.Message):
    __slots__ = ("queries", "keys", "matrix")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    MATRIX_FIELD_NUMBER: _ClassVar[int]
    queries: str
    keys: str
    matrix: _tensor_pb2.Tensor
    def __init__(self, queries: _Optional[str] = ..., keys: _Optional[str] = ..., matrix: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class TextRelevance(_message.Message):
    __slots__ = ("text", "tokens", "relevance")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    RELEVANCE_FIELD_NUMBER: _ClassVar[int]
    text: str
    tokens: _containers.RepeatedScalarFieldContainer[str]
    relevance: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, text: _Optional[str] = ..., tokens: _Optional[_Iterable[str]] = ..., relevance: _Optional[_Iterable[float]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("index", "label", "probability", "logit")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    probability: float
    logit: float
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., probability: _Optional[float] = ..., logit: _Optional[float] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("preprocess_seconds", "queue_seconds", "compute_seconds", "total_seconds")
    PREPROCESS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    preprocess_seconds: float
    queue_seconds: float
    compute_seconds: float
    total_seconds: float
    def __init__(self, preprocess_seconds: _Optional[float] = ..., queue_seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "images", "top_k", "prompts", "questions", "regions", "detection_threshold")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    DETECTION_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Image]
    top_k: int
    prompts: _containers.RepeatedScalarFieldContainer[str]
    questions: _containers.RepeatedScalarFieldContainer[str]
    regions: _containers.RepeatedCompositeFieldContainer[Regions]
    detection_threshold: float
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_tensor_pb2.Image, _Mapping]]] = ..., top_k: _Optional[int] = ..., prompts: _Optional[_Iterable[str]] = ..., questions: _Optional[_Iterable[str]] = ..., regions: _Optional[_Iterable[_Union[Regions, _Mapping]]] = ..., detection_threshold: _Optional[float] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("model", "results", "timing")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    model: str
    results: _containers.RepeatedCompositeFieldContainer[Classification]
    timing: Timing
    def __init__(self, model: _Optional[str] = ..., results: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("id", "predictions", "detections")
    ID_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    id: str
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    detections: _containers.RepeatedCompositeFieldContainer[Detection]
    def __init__(self, id: _Optional[str] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "architecture", "input_size", "mean", "std", "patch_size", "patch_grid", "num_prefix_tokens", "num_layers", "num_heads", "labels", "methods", "weights", "device", "readout", "task", "modalities", "prompt_template", "visual_input", "region_feature_dim", "stream_architecture")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PATCH_GRID_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    READOUT_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    VISUAL_INPUT_FIELD_NUMBER: _ClassVar[int]
    REGION_FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    STREAM_ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    name: str
    architecture: str
    input_size: _containers.RepeatedScalarFieldContainer[int]
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    patch_size: _containers.RepeatedScalarFieldContainer[int]
    patch_grid: _containers.RepeatedScalarFieldContainer[int]
    num_prefix_tokens: int
    num_layers: int
    num_heads: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    methods: _containers.RepeatedCompositeFieldContainer[MethodInfo]
    weights: Weights
    device: str
    readout: str
    task: Task
    modalities: _containers.RepeatedCompositeFieldContainer[Modality]
    prompt_template: str
    visual_input: str
    region_feature_dim: int
    stream_architecture: str
    def __init__(self, name: _Optional[str] = ..., architecture: _Optional[str] = ..., input_size: _Optional[_Iterable[int]] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., patch_size: _Optional[_Iterable[int]] = ..., patch_grid: _Optional[_Iterable[int]] = ..., num_prefix_tokens: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_heads: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., methods: _Optional[_Iterable[_Union[MethodInfo, _Mapping]]] = ..., weights: _Optional[_Union[Weights, _Mapping]] = ..., device: _Optional[str] = ..., readout: _Optional[str] = ..., task: _Optional[_Union[Task, str]] = ..., modalities: _Optional[_Iterable[_Union[Modality, _Mapping]]] = ..., prompt_template: _Optional[str] = ..., visual_input: _Optional[str] = ..., region_feature_dim: _Optional[int] = ..., stream_architecture: _Optional[str] = ...) -> None: ...

class Modality(_message.Message):
    __slots__ = ("name", "num_tokens", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_tokens: int
    description: str
    def __init__(self, name: _Optional[str] = ..., num_tokens: _Optional[int] = ..., description: _Optional[str] = ...) -> None: ...

class Weights(_message.Message):
    __slots__ = ("source", "random", "sha256", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    RANDOM_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    source: str
    random: bool
    sha256: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, source: _Optional[str] = ..., random: _Optional[bool] = ..., sha256: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class MethodInfo(_message.Message):
    __slots__ = ("name", "description", "passes", "class_specific", "relevance_matrix", "parameters", "modalities")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PASSES_FIELD_NUMBER: _ClassVar[int]
    CLASS_SPECIFIC_FIELD_NUMBER: _ClassVar[int]
    RELEVANCE_MATRIX_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    passes: _containers.RepeatedScalarFieldContainer[str]
    class_specific: bool
    relevance_matrix: bool
    parameters: _containers.RepeatedCompositeFieldContainer[MethodParameter]
    modalities: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., passes: _Optional[_Iterable[str]] = ..., class_specific: _Optional[bool] = ..., relevance_matrix: _Optional[bool] = ..., parameters: _Optional[_Iterable[_Union[MethodParameter, _Mapping]]] = ..., modalities: _Optional[_Iterable[str]] = ...) -> None: ...

class MethodParameter(_message.Message):
    __slots__ = ("name", "type", "default_json", "description", "choices")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_JSON_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    default_json: str
    description: str
    choices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., default_json: _Optional[str] = ..., description: _Optional[str] = ..., choices: _Optional[_Iterable[str]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("model", "methods", "metrics", "dataset", "method_options", "metric_options", "explain_label")
    class MethodOptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _struct_pb2.Struct
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...
    class MetricOptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _struct_pb2.Struct
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    METHOD_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    METRIC_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_LABEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    methods: _containers.RepeatedScalarFieldContainer[str]
    metrics: _containers.RepeatedScalarFieldContainer[str]
    dataset: Dataset
    method_options: _containers.MessageMap[str, _struct_pb2.Struct]
    metric_options: _containers.MessageMap[str, _struct_pb2.Struct]
    explain_label: bool
    def __init__(self, model: _Optional[str] = ..., methods: _Optional[_Iterable[str]] = ..., metrics: _Optional[_Iterable[str]] = ..., dataset: _Optional[_Union[Dataset, _Mapping]] = ..., method_options: _Optional[_Mapping[str, _struct_pb2.Struct]] = ..., metric_options: _Optional[_Mapping[str, _struct_pb2.Struct]] = ..., explain_label: _Optional[bool] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("synthetic", "server_path", "inline", "limit")
    SYNTHETIC_FIELD_NUMBER: _ClassVar[int]
    SERVER_PATH_FIELD_NUMBER: _ClassVar[int]
    INLINE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    synthetic: str
    server_path: str
    inline: InlineDataset
    limit: int
    def __init__(self, synthetic: _Optional[str] = ..., server_path: _Optional[str] = ..., inline: _Optional[_Union[InlineDataset, _Mapping]] = ..., limit: _Optional[int] = ...) -> None: ...

class InlineDataset(_message.Message):
    __slots__ = ("samples",)
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    def __init__(self, samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("image", "label", "mask")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    image: _tensor_pb2.Image
    label: int
    mask: _tensor_pb2.Tensor
    def __init__(self, image: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ..., label: _Optional[int] = ..., mask: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class EvaluateEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    result: MetricResult
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[MetricResult, _Mapping]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("done", "total", "images_per_second", "eta_seconds", "stage")
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    done: int
    total: int
    images_per_second: float
    eta_seconds: float
    stage: str
    def __init__(self, done: _Optional[int] = ..., total: _Optional[int] = ..., images_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., stage: _Optional[str] = ...) -> None: ...

class MetricResult(_message.Message):
    __slots__ = ("method", "metric", "values", "curves")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    CURVES_FIELD_NUMBER: _ClassVar[int]
    method: str
    metric: str
    values: _containers.RepeatedCompositeFieldContainer[Statistic]
    curves: _containers.RepeatedCompositeFieldContainer[Curve]
    def __init__(self, method: _Optional[str] = ..., metric: _Optional[str] = ..., values: _Optional[_Iterable[_Union[Statistic, _Mapping]]] = ..., curves: _Optional[_Iterable[_Union[Curve, _Mapping]]] = ...) -> None: ...

class Statistic(_message.Message):
    __slots__ = ("name", "mean", "std", "ci95_low", "ci95_high", "n")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    CI95_LOW_FIELD_NUMBER: _ClassVar[int]
    CI95_HIGH_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    name: str
    mean: float
    std: float
    ci95_low: float
    ci95_high: float
    n: int
    def __init__(self, name: _Optional[str] = ..., mean: _Optional[float] = ..., std: _Optional[float] = ..., ci95_low: _Optional[float] = ..., ci95_high: _Optional[float] = ..., n: _Optional[int] = ...) -> None: ...

class Curve(_message.Message):
    __slots__ = ("name", "x", "y")
    NAME_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    name: str
    x: _containers.RepeatedScalarFieldContainer[float]
    y: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., x: _Optional[_Iterable[float]] = ..., y: _Optional[_Iterable[float]] = ...) -> None: ...
