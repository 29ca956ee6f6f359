// nim_detokenizer: a Triton backend that runs the `postprocessing` model natively.
//
// Same inputs and outputs as the python postprocessing model (TOKENS_BATCH [batch, beam, len] INT32,
// SEQUENCE_LENGTH [batch, beam] INT32, optional STREAM_KEY UINT64 -> OUTPUT [batch * beam] BYTES, flat as upstream)
// and the same text: every token id maps to the bytes it contributes to a decode (the table `nim_build repo` writes
// after checking it against the tokenizer itself), the bytes are decoded as UTF-8 with U+FFFD for each maximal
// invalid subpart (what Python's errors="replace" and Rust's from_utf8_lossy do), and a streaming request,
// recognised by its stream key or else its request id, keeps the bytes of a character that is not complete yet for
// its next step. A request that Triton marks cancelled (its ensemble client left) makes the backend send
// `tensorrt_llm` a stop request for that stream.
//
// The python backend costs tens of microseconds per request (shared-memory IPC with a stub process); a stream
// step here costs a few, so detokenization keeps up with one response per token at GPU decoding rates.
//
// The Triton C API is declared below by hand (only the calls used here); the types and values are those of
// Triton's tritonserver.h / tritonbackend.h, stable across releases (backend API 1.x).

#include <pthread.h>
#include <time.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

extern "C" {
struct TRITONSERVER_Error;
struct TRITONSERVER_Message;
struct TRITONSERVER_Server;
struct TRITONSERVER_InferenceRequest;
struct TRITONSERVER_InferenceResponse;
struct TRITONSERVER_ResponseAllocator;
struct TRITONBACKEND_Model;
struct TRITONBACKEND_ModelInstance;
struct TRITONBACKEND_Request;
struct TRITONBACKEND_Response;
struct TRITONBACKEND_Input;
struct TRITONBACKEND_Output;

enum TRITONSERVER_DataType { TYPE_INVALID, TYPE_BOOL, TYPE_UINT8, TYPE_UINT16, TYPE_UINT32, TYPE_UINT64,
                             TYPE_INT8, TYPE_INT16, TYPE_INT32, TYPE_INT64, TYPE_FP16, TYPE_FP32, TYPE_FP64,
                             TYPE_BYTES, TYPE_BF16 };
enum TRITONSERVER_MemoryType { MEMORY_CPU, MEMORY_CPU_PINNED, MEMORY_GPU };
enum TRITONSERVER_LogLevel { LOG_INFO, LOG_WARN, LOG_ERROR, LOG_VERBOSE };
enum TRITONSERVER_Error_Code { ERROR_UNKNOWN, ERROR_INTERNAL, ERROR_NOT_FOUND, ERROR_INVALID_ARG,
                               ERROR_UNAVAILABLE, ERROR_UNSUPPORTED, ERROR_ALREADY_EXISTS, ERROR_CANCELLED };
enum TRITONBACKEND_ArtifactType { ARTIFACT_FILESYSTEM };
const uint32_t REQUEST_RELEASE_ALL = 1;
const uint32_t RESPONSE_COMPLETE_FINAL = 1;

typedef TRITONSERVER_Error* (*AllocFn)(TRITONSERVER_ResponseAllocator*, const char*, size_t, TRITONSERVER_MemoryType,
                                       int64_t, void*, void**, void**, TRITONSERVER_MemoryType*, int64_t*);
typedef TRITONSERVER_Error* (*ReleaseFn)(TRITONSERVER_ResponseAllocator*, void*, void*, size_t,
                                         TRITONSERVER_MemoryType, int64_t);
typedef TRITONSERVER_Error* (*StartFn)(TRITONSERVER_ResponseAllocator*, void*);
typedef void (*RequestReleaseFn)(TRITONSERVER_InferenceRequest*, const uint32_t, void*);
typedef void (*ResponseCompleteFn)(TRITONSERVER_InferenceResponse*, const uint32_t, void*);

TRITONSERVER_Error* TRITONSERVER_ErrorNew(TRITONSERVER_Error_Code code, const char* msg);
void TRITONSERVER_ErrorDelete(TRITONSERVER_Error* error);
const char* TRITONSERVER_ErrorMessage(TRITONSERVER_Error* error);
TRITONSERVER_Error* TRITONSERVER_LogMessage(TRITONSERVER_LogLevel level, const char* filename, const int line,
                                            const char* msg);
TRITONSERVER_Error* TRITONSERVER_MessageSerializeToJson(TRITONSERVER_Message* message, const char** base,
                                                        size_t* byte_size);
TRITONSERVER_Error* TRITONSERVER_MessageDelete(TRITONSERVER_Message* message);
TRITONSERVER_Error* TRITONSERVER_ResponseAllocatorNew(TRITONSERVER_ResponseAllocator** allocator, AllocFn alloc_fn,
                                                      ReleaseFn release_fn, StartFn start_fn);
TRITONSERVER_Error* TRITONSERVER_ResponseAllocatorDelete(TRITONSERVER_ResponseAllocator* allocator);
TRITONSERVER_Error* TRITONSERVER_InferenceRequestNew(TRITONSERVER_InferenceRequest** request,
                                                     TRITONSERVER_Server* server, const char* model_name,
                                                     const int64_t model_version);
TRITONSERVER_Error* TRITONSERVER_InferenceRequestDelete(TRITONSERVER_InferenceRequest* request);
TRITONSERVER_Error* TRITONSERVER_InferenceRequestSetId(TRITONSERVER_InferenceRequest* request, const char* id);
TRITONSERVER_Error* TRITONSERVER_InferenceRequestAddInput(TRITONSERVER_InferenceRequest* request, const char* name,
                                                          const TRITONSERVER_DataType datatype,
                                                          const int64_t* shape, uint64_t dim_count);
TRITONSERVER_Error* TRITONSERVER_InferenceRequestAppendInputData(TRITONSERVER_InferenceRequest* request,
                                                                 const char* name, const void* base,
                                                                 size_t byte_size,
                                                                 TRITONSERVER_MemoryType memory_type,
                                                                 int64_t memory_type_id);
TRITONSERVER_Error* TRITONSERVER_InferenceRequestSetReleaseCallback(TRITONSERVER_InferenceRequest* request,
                                                                    RequestReleaseFn fn, void* userp);
TRITONSERVER_Error* TRITONSERVER_InferenceRequestSetResponseCallback(TRITONSERVER_InferenceRequest* request,
                                                                     TRITONSERVER_ResponseAllocator* allocator,
                                                                     void* allocator_userp,
                                                                     ResponseCompleteFn fn, void* userp);
TRITONSERVER_Error* TRITONSERVER_InferenceResponseDelete(TRITONSERVER_InferenceResponse* response);
TRITONSERVER_Error* TRITONSERVER_ServerInferAsync(TRITONSERVER_Server* server,
                                                  TRITONSERVER_InferenceRequest* request, void* trace);

TRITONSERVER_Error* TRITONBACKEND_ModelConfig(TRITONBACKEND_Model* model, const uint32_t config_version,
                                              TRITONSERVER_Message** model_config);
TRITONSERVER_Error* TRITONBACKEND_ModelRepository(TRITONBACKEND_Model* model,
                                                  TRITONBACKEND_ArtifactType* artifact_type,
                                                  const char** location);
TRITONSERVER_Error* TRITONBACKEND_ModelVersion(TRITONBACKEND_Model* model, uint64_t* version);
TRITONSERVER_Error* TRITONBACKEND_ModelServer(TRITONBACKEND_Model* model, TRITONSERVER_Server** server);
TRITONSERVER_Error* TRITONBACKEND_ModelState(TRITONBACKEND_Model* model, void** state);
TRITONSERVER_Error* TRITONBACKEND_ModelSetState(TRITONBACKEND_Model* model, void* state);
TRITONSERVER_Error* TRITONBACKEND_ModelInstanceModel(TRITONBACKEND_ModelInstance* instance,
                                                     TRITONBACKEND_Model** model);
TRITONSERVER_Error* TRITONBACKEND_ModelInstanceReportStatistics(TRITONBACKEND_ModelInstance* instance,
                                                                TRITONBACKEND_Request* request, const bool success,
                                                                const uint64_t exec_start_ns,
                                                                const uint64_t compute_start_ns,
                                                                const uint64_t compute_end_ns,
                                                                const uint64_t exec_end_ns);
TRITONSERVER_Error* TRITONBACKEND_ModelInstanceReportBatchStatistics(TRITONBACKEND_ModelInstance* instance,
                                                                     const uint64_t batch_size,
                                                                     const uint64_t exec_start_ns,
                                                                     const uint64_t compute_start_ns,
                                                                     const uint64_t compute_end_ns,
                                                                     const uint64_t exec_end_ns);
TRITONSERVER_Error* TRITONBACKEND_RequestId(TRITONBACKEND_Request* request, const char** id);
TRITONSERVER_Error* TRITONBACKEND_RequestIsCancelled(TRITONBACKEND_Request* request, bool* is_cancelled);
TRITONSERVER_Error* TRITONBACKEND_RequestInput(TRITONBACKEND_Request* request, const char* name,
                                               TRITONBACKEND_Input** input);
TRITONSERVER_Error* TRITONBACKEND_RequestRelease(TRITONBACKEND_Request* request, uint32_t release_flags);
TRITONSERVER_Error* TRITONBACKEND_InputProperties(TRITONBACKEND_Input* input, const char** name,
                                                  TRITONSERVER_DataType* datatype, const int64_t** shape,
                                                  uint32_t* dims_count, uint64_t* byte_size,
                                                  uint32_t* buffer_count);
TRITONSERVER_Error* TRITONBACKEND_InputBuffer(TRITONBACKEND_Input* input, const uint32_t index, const void** buffer,
                                              uint64_t* buffer_byte_size, TRITONSERVER_MemoryType* memory_type,
                                              int64_t* memory_type_id);
TRITONSERVER_Error* TRITONBACKEND_ResponseNew(TRITONBACKEND_Response** response, TRITONBACKEND_Request* request);
TRITONSERVER_Error* TRITONBACKEND_ResponseOutput(TRITONBACKEND_Response* response, TRITONBACKEND_Output** output,
                                                 const char* name, const TRITONSERVER_DataType datatype,
                                                 const int64_t* shape, const uint32_t dims_count);
TRITONSERVER_Error* TRITONBACKEND_OutputBuffer(TRITONBACKEND_Output* output, void** buffer,
                                               const uint64_t buffer_byte_size,
                                               TRITONSERVER_MemoryType* memory_type, int64_t* memory_type_id);
TRITONSERVER_Error* TRITONBACKEND_ResponseSend(TRITONBACKEND_Response* response, const uint32_t send_flags,
                                               TRITONSERVER_Error* error);
}  // extern "C"

namespace {

const char kPiecesFile[] = "detokenizer.bin";  // in the model's version folder, written by `nim_build repo`
const char kMagic[8] = {'N', 'I', 'M', 'D', 'T', 'O', 'K', '1'};
const char kReplacement[] = "\xEF\xBF\xBD";  // U+FFFD
const uint64_t kStateTtlNs = 120ull * 1000000000ull;  // idle streams are forgotten (as the python model does)
const size_t kMaxStates = 4096;

uint64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

void LogAt(TRITONSERVER_LogLevel level, int line, const std::string& msg) {
  if (TRITONSERVER_Error* err = TRITONSERVER_LogMessage(level, __FILE__, line, msg.c_str())) {
    TRITONSERVER_ErrorDelete(err);
  }
}
#define LOG(level, msg) LogAt(level, __LINE__, msg)  // Triton's log shows the caller's line

TRITONSERVER_Error* Error(TRITONSERVER_Error_Code code, const std::string& msg) {
  return TRITONSERVER_ErrorNew(code, msg.c_str());
}

#define RETURN_IF_ERROR(X)                      \
  do {                                          \
    if (TRITONSERVER_Error* err__ = (X)) return err__; \
  } while (false)

// Appends the UTF-8 characters of in[0, n) to out, one U+FFFD per maximal invalid subpart (Unicode's
// recommended practice). Returns how many trailing bytes start a character that more bytes could still
// complete: held back by a stream, replaced when `final`.
size_t AppendUtf8(const char* in, size_t n, bool final, std::string* out) {
  size_t i = 0;
  while (i < n) {
    const unsigned char c = in[i];
    if (c < 0x80) {
      size_t j = i + 1;
      while (j < n && static_cast<unsigned char>(in[j]) < 0x80) ++j;  // ASCII runs in one append
      out->append(in + i, j - i);
      i = j;
      continue;
    }
    size_t need;
    unsigned char lo = 0x80, hi = 0xBF;  // the allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      need = 1;
    } else if (c == 0xE0) {
      need = 2, lo = 0xA0;
    } else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) {
      need = 2;
    } else if (c == 0xED) {
      need = 2, hi = 0x9F;
    } else if (c == 0xF0) {
      need = 3, lo = 0x90;
    } else if (c >= 0xF1 && c <= 0xF3) {
      need = 3;
    } else if (c == 0xF4) {
      need = 3, hi = 0x8F;
    } else {
      out->append(kReplacement);
      ++i;
      continue;
    }
    size_t j = 1;  // bytes of this character that are valid so far
    for (; j <= need && i + j < n; ++j) {
      const unsigned char d = in[i + j];
      if (j == 1 ? (d < lo || d > hi) : (d < 0x80 || d > 0xBF)) break;
    }
    if (j > need) {
      out->append(in + i, need + 1);
      i += need + 1;
    } else if (i + j == n && !final) {
      return n - i;
    } else {
      out->append(kReplacement);
      i += j;
    }
  }
  return 0;
}

struct Stream {
  std::string pending;  // the start of a character that is not complete yet
  bool started = false;  // has the stream seen a byte (the leading-space strip applies to the first only)
  uint64_t last_used_ns = 0;
};

struct ModelState {
  std::vector<uint32_t> offsets;  // token id i contributes bytes[offsets[i], offsets[i + 1])
  std::string bytes;
  bool strip_leading_space = false;  // sentencepiece decoders drop the space that starts a decoded text
  std::string llm_model = "tensorrt_llm";
  TRITONSERVER_Server* server = nullptr;
  TRITONSERVER_ResponseAllocator* allocator = nullptr;  // for the (empty) responses to stop requests

  std::mutex mu;
  std::unordered_map<std::string, Stream> streams;
  std::unordered_set<std::string> cancelled;  // streams already stopped (their later steps arrive cancelled)
  std::deque<std::string> cancelled_order;
  uint64_t last_sweep_ns = 0;

  // Decodes ids into out. A stream passes its state; without one the bytes are final (a one-shot decode).
  TRITONSERVER_Error* Decode(const int32_t* ids, size_t n, Stream* stream, std::string* out) const {
    std::string buf = stream ? std::move(stream->pending) : std::string();
    bool started = stream ? stream->started : false;
    const size_t vocab = offsets.size() - 1;
    for (size_t k = 0; k < n; ++k) {
      if (ids[k] < 0 || static_cast<size_t>(ids[k]) >= vocab) {
        return Error(ERROR_INVALID_ARG, "token id " + std::to_string(ids[k]) + " is outside the vocabulary (" +
                                            std::to_string(vocab) + " ids)");
      }
      const uint32_t a = offsets[ids[k]], b = offsets[ids[k] + 1];
      if (a == b) continue;
      if (!started) {
        started = true;
        if (strip_leading_space && bytes[a] == ' ') {
          buf.append(bytes, a + 1, b - a - 1);
          continue;
        }
      }
      buf.append(bytes, a, b - a);
    }
    const size_t held = AppendUtf8(buf.data(), buf.size(), stream == nullptr, out);
    if (stream) {
      stream->pending.assign(buf, buf.size() - held, held);
      stream->started = started;
    }
    return nullptr;
  }

  // Forget idle streams: at most once a second, and whenever there are too many (then down to 3/4 of the
  // limit, dropping the idlest first, so that a full map costs one pass per kMaxStates / 4 new streams).
  void Sweep(uint64_t now) {
    const bool full = streams.size() > kMaxStates;
    if (now - last_sweep_ns < 1000000000ull && !full) return;
    last_sweep_ns = now;
    for (uint64_t ttl = kStateTtlNs;; ttl /= 2) {
      for (auto it = streams.begin(); it != streams.end();) {
        const uint64_t last = it->second.last_used_ns;
        it = now > last && now - last >= ttl ? streams.erase(it) : std::next(it);
      }
      if (!full || streams.size() <= kMaxStates * 3 / 4 || ttl == 0) break;
    }
  }

  // Returns true the first time an id is seen cancelled.
  bool MarkCancelled(const std::string& id) {
    streams.erase(id);
    if (!cancelled.insert(id).second) return false;
    cancelled_order.push_back(id);
    if (cancelled_order.size() > kMaxStates) {
      cancelled.erase(cancelled_order.front());
      cancelled_order.pop_front();
    }
    return true;
  }
};

TRITONSERVER_Error* LoadPieces(const std::string& path, ModelState* state) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return Error(ERROR_NOT_FOUND, path + " not found: regenerate the repository with `nim_build repo`");
  char magic[8];
  uint32_t flags = 0, count = 0;
  f.read(magic, 8);
  f.read(reinterpret_cast<char*>(&flags), 4);
  f.read(reinterpret_cast<char*>(&count), 4);
  if (!f || std::memcmp(magic, kMagic, 8) != 0) {
    return Error(ERROR_INVALID_ARG, path + " is not a nim_build detokenizer table");
  }
  state->strip_leading_space = flags & 1;
  state->offsets.resize(static_cast<size_t>(count) + 1);
  f.read(reinterpret_cast<char*>(state->offsets.data()), 4 * state->offsets.size());
  state->bytes.resize(f ? state->offsets.back() : 0);
  f.read(&state->bytes[0], state->bytes.size());
  if (!f || state->offsets[0] != 0) return Error(ERROR_INVALID_ARG, path + " is truncated");
  for (size_t i = 0; i < count; ++i) {
    if (state->offsets[i] > state->offsets[i + 1]) return Error(ERROR_INVALID_ARG, path + " is corrupt");
  }
  return nullptr;
}

// The string value of a model config parameter, from the config's JSON ({"parameters":{"key":
// {"string_value":"..."}}}, as Triton serializes it: compact, keys quoted). Empty when absent.
std::string Parameter(const std::string& json, const std::string& key) {
  const std::string needle = "\"" + key + "\":{\"string_value\":\"";
  const size_t at = json.find(needle);
  if (at == std::string::npos) return "";
  std::string value;
  for (size_t i = at + needle.size(); i < json.size() && json[i] != '"'; ++i) {
    if (json[i] == '\\' && i + 1 < json.size()) ++i;
    value.push_back(json[i]);
  }
  return value;
}

TRITONSERVER_Error* AllocCpu(TRITONSERVER_ResponseAllocator*, const char*, size_t byte_size, TRITONSERVER_MemoryType,
                             int64_t, void*, void** buffer, void** buffer_userp,
                             TRITONSERVER_MemoryType* actual_memory_type, int64_t* actual_memory_type_id) {
  *buffer = byte_size ? std::malloc(byte_size) : nullptr;
  *buffer_userp = nullptr;
  *actual_memory_type = MEMORY_CPU;
  *actual_memory_type_id = 0;
  return nullptr;
}

TRITONSERVER_Error* ReleaseCpu(TRITONSERVER_ResponseAllocator*, void* buffer, void*, size_t, TRITONSERVER_MemoryType,
                               int64_t) {
  std::free(buffer);
  return nullptr;
}

void StopRequestReleased(TRITONSERVER_InferenceRequest* request, const uint32_t flags, void* key_data) {
  if (flags & REQUEST_RELEASE_ALL) {
    TRITONSERVER_InferenceRequestDelete(request);
    delete static_cast<uint64_t*>(key_data);
  }
}

void StopResponseComplete(TRITONSERVER_InferenceResponse* response, const uint32_t, void*) {
  if (response) TRITONSERVER_InferenceResponseDelete(response);
}

// Ask tensorrt_llm to end a stream: the TensorRT-LLM backend's `stop` input for the requests with this id, or, with
// a stream key, for that one stream (as the python models send it: triton_common.stop_llm_request). Asynchronous:
// the engine answers within a step.
void SendStop(ModelState* state, const std::string& id, bool has_key, uint64_t key) {
  static const int64_t shape[2] = {1, 1};
  static const int32_t zero = 0;
  static const bool stop = true;
  auto* key_data = new uint64_t(key);  // freed with the request
  TRITONSERVER_InferenceRequest* request = nullptr;
  TRITONSERVER_Error* err = TRITONSERVER_InferenceRequestNew(&request, state->server, state->llm_model.c_str(), -1);
  if (!err) err = TRITONSERVER_InferenceRequestSetId(request, id.c_str());
  if (!err) err = TRITONSERVER_InferenceRequestAddInput(request, "input_lengths", TYPE_INT32, shape, 2);
  if (!err) err = TRITONSERVER_InferenceRequestAppendInputData(request, "input_lengths", &zero, 4, MEMORY_CPU, 0);
  if (!err) err = TRITONSERVER_InferenceRequestAddInput(request, "request_output_len", TYPE_INT32, shape, 2);
  if (!err) err = TRITONSERVER_InferenceRequestAppendInputData(request, "request_output_len", &zero, 4, MEMORY_CPU, 0);
  if (!err) err = TRITONSERVER_InferenceRequestAddInput(request, "stop", TYPE_BOOL, shape, 2);
  if (!err) err = TRITONSERVER_InferenceRequestAppendInputData(request, "stop", &stop, 1, MEMORY_CPU, 0);
  if (!err && has_key) err = TRITONSERVER_InferenceRequestAddInput(request, "stream_key", TYPE_UINT64, shape, 2);
  if (!err && has_key) {
    err = TRITONSERVER_InferenceRequestAppendInputData(request, "stream_key", key_data, 8, MEMORY_CPU, 0);
  }
  if (!err) err = TRITONSERVER_InferenceRequestSetReleaseCallback(request, StopRequestReleased, key_data);
  if (!err) {
    err = TRITONSERVER_InferenceRequestSetResponseCallback(request, state->allocator, nullptr, StopResponseComplete,
                                                           nullptr);
  }
  if (!err) err = TRITONSERVER_ServerInferAsync(state->server, request, nullptr);
  if (err) {
    LOG(LOG_ERROR, "could not stop " + state->llm_model + " request '" + id + "': " + TRITONSERVER_ErrorMessage(err));
    TRITONSERVER_ErrorDelete(err);
    if (request) TRITONSERVER_InferenceRequestDelete(request);
    delete key_data;
  }
}

// One CPU input of a request, as (shape, data); data may be copied into `scratch` when Triton split it.
TRITONSERVER_Error* ReadInput(TRITONBACKEND_Request* request, const char* name, std::vector<int64_t>* shape,
                              const int32_t** data, std::vector<char>* scratch) {
  TRITONBACKEND_Input* input;
  RETURN_IF_ERROR(TRITONBACKEND_RequestInput(request, name, &input));
  TRITONSERVER_DataType dtype;
  const int64_t* dims;
  uint32_t dims_count, buffer_count;
  uint64_t byte_size;
  RETURN_IF_ERROR(TRITONBACKEND_InputProperties(input, nullptr, &dtype, &dims, &dims_count, &byte_size,
                                                &buffer_count));
  if (dtype != TYPE_INT32) return Error(ERROR_INVALID_ARG, std::string(name) + " must be INT32");
  shape->assign(dims, dims + dims_count);
  scratch->clear();
  for (uint32_t b = 0; b < buffer_count; ++b) {
    const void* buffer;
    uint64_t size;
    TRITONSERVER_MemoryType memory_type;
    int64_t memory_type_id;
    RETURN_IF_ERROR(TRITONBACKEND_InputBuffer(input, b, &buffer, &size, &memory_type, &memory_type_id));
    if (memory_type == MEMORY_GPU) {
      return Error(ERROR_UNSUPPORTED, std::string(name) + " arrived in GPU memory; postprocessing reads CPU memory");
    }
    if (buffer_count == 1) {
      *data = static_cast<const int32_t*>(buffer);
      return nullptr;
    }
    scratch->insert(scratch->end(), static_cast<const char*>(buffer), static_cast<const char*>(buffer) + size);
  }
  *data = reinterpret_cast<const int32_t*>(scratch->data());
  return nullptr;
}

// The optional STREAM_KEY input (UINT64 [1, 1]): the reference tensorrt_llm's private key of an ensemble stream.
TRITONSERVER_Error* ReadStreamKey(TRITONBACKEND_Request* request, bool* has_key, uint64_t* key) {
  *has_key = false;
  TRITONBACKEND_Input* input;
  if (TRITONSERVER_Error* absent = TRITONBACKEND_RequestInput(request, "STREAM_KEY", &input)) {
    TRITONSERVER_ErrorDelete(absent);
    return nullptr;
  }
  TRITONSERVER_DataType dtype;
  const int64_t* dims;
  uint32_t dims_count, buffer_count;
  uint64_t byte_size;
  RETURN_IF_ERROR(TRITONBACKEND_InputProperties(input, nullptr, &dtype, &dims, &dims_count, &byte_size,
                                                &buffer_count));
  if (dtype != TYPE_UINT64 || byte_size != 8 || buffer_count != 1) {
    return Error(ERROR_INVALID_ARG, "STREAM_KEY must be one UINT64");
  }
  const void* buffer;
  uint64_t size;
  TRITONSERVER_MemoryType memory_type;
  int64_t memory_type_id;
  RETURN_IF_ERROR(TRITONBACKEND_InputBuffer(input, 0, &buffer, &size, &memory_type, &memory_type_id));
  std::memcpy(key, buffer, 8);
  *has_key = true;
  return nullptr;
}

// The OUTPUT texts of one request: batch x beam strings, flat (upstream's shape).
TRITONSERVER_Error* DecodeRequest(ModelState* state, TRITONBACKEND_Request* request, const char* id, uint64_t now,
                                  std::vector<int64_t>* out_shape, std::vector<std::string>* texts) {
  std::vector<int64_t> tshape, lshape;
  const int32_t *tokens, *lengths;
  std::vector<char> tscratch, lscratch;
  RETURN_IF_ERROR(ReadInput(request, "TOKENS_BATCH", &tshape, &tokens, &tscratch));
  RETURN_IF_ERROR(ReadInput(request, "SEQUENCE_LENGTH", &lshape, &lengths, &lscratch));
  if (tshape.size() == 2) tshape.insert(tshape.begin() + 1, 1);  // [batch, len]: one beam
  if (tshape.size() != 3) return Error(ERROR_INVALID_ARG, "TOKENS_BATCH must be [batch, beam, len]");
  const int64_t batch = tshape[0], beams = tshape[1], len = tshape[2];
  int64_t lcount = 1;
  for (int64_t d : lshape) lcount *= d;
  if (lcount != batch * beams) return Error(ERROR_INVALID_ARG, "SEQUENCE_LENGTH must be [batch, beam]");
  // A stream step is one sequence of a request with an id (every step of a stream carries the client's id).
  const bool stream = id[0] != '\0' && batch == 1 && beams == 1;
  *out_shape = {batch * beams};
  texts->assign(batch * beams, std::string());
  for (int64_t s = 0; s < batch * beams; ++s) {
    const int64_t n = lengths[s];
    if (n < 0 || n > len) return Error(ERROR_INVALID_ARG, "SEQUENCE_LENGTH is outside 0..TOKENS_BATCH's length");
    const int32_t* ids = tokens + s * len;
    if (!stream) {
      RETURN_IF_ERROR(state->Decode(ids, n, nullptr, &(*texts)[s]));
      continue;
    }
    std::lock_guard<std::mutex> lock(state->mu);
    Stream& st = state->streams[id];
    st.last_used_ns = now;
    RETURN_IF_ERROR(state->Decode(ids, n, &st, &(*texts)[s]));
  }
  return nullptr;
}

TRITONSERVER_Error* FillOutput(TRITONBACKEND_Response* response, const std::vector<int64_t>& shape,
                              const std::vector<std::string>& texts) {
  uint64_t size = 0;
  for (const std::string& t : texts) size += 4 + t.size();
  TRITONBACKEND_Output* output;
  RETURN_IF_ERROR(TRITONBACKEND_ResponseOutput(response, &output, "OUTPUT", TYPE_BYTES, shape.data(), shape.size()));
  void* buffer;
  TRITONSERVER_MemoryType memory_type = MEMORY_CPU;
  int64_t memory_type_id = 0;
  RETURN_IF_ERROR(TRITONBACKEND_OutputBuffer(output, &buffer, size, &memory_type, &memory_type_id));
  if (memory_type == MEMORY_GPU) return Error(ERROR_INTERNAL, "OUTPUT was given GPU memory");
  char* p = static_cast<char*>(buffer);
  for (const std::string& t : texts) {
    const uint32_t n = t.size();
    std::memcpy(p, &n, 4);  // BYTES elements: little-endian length, then the bytes
    std::memcpy(p + 4, t.data(), n);
    p += 4 + n;
  }
  return nullptr;
}

}  // namespace

extern "C" {

TRITONSERVER_Error* TRITONBACKEND_ModelInitialize(TRITONBACKEND_Model* model) {
  auto* state = new ModelState();
  TRITONSERVER_Error* err = [&]() -> TRITONSERVER_Error* {
    TRITONBACKEND_ArtifactType artifact;
    const char* location;
    uint64_t version;
    RETURN_IF_ERROR(TRITONBACKEND_ModelRepository(model, &artifact, &location));
    RETURN_IF_ERROR(TRITONBACKEND_ModelVersion(model, &version));
    RETURN_IF_ERROR(LoadPieces(std::string(location) + "/" + std::to_string(version) + "/" + kPiecesFile, state));
    TRITONSERVER_Message* config;
    RETURN_IF_ERROR(TRITONBACKEND_ModelConfig(model, 1, &config));
    const char* json;
    size_t json_size;
    TRITONSERVER_Error* e = TRITONSERVER_MessageSerializeToJson(config, &json, &json_size);
    if (!e) {
      const std::string llm = Parameter(std::string(json, json_size), "tensorrt_llm_model_name");
      if (!llm.empty()) state->llm_model = llm;
    }
    TRITONSERVER_MessageDelete(config);
    RETURN_IF_ERROR(e);
    RETURN_IF_ERROR(TRITONBACKEND_ModelServer(model, &state->server));
    RETURN_IF_ERROR(TRITONSERVER_ResponseAllocatorNew(&state->allocator, AllocCpu, ReleaseCpu, nullptr));
    return TRITONBACKEND_ModelSetState(model, state);
  }();
  if (err) {
    if (state->allocator) TRITONSERVER_ResponseAllocatorDelete(state->allocator);
    delete state;
    return err;
  }
  LOG(LOG_INFO, "nim_detokenizer: " + std::to_string(state->offsets.size() - 1) + " token pieces, stops go to " +
                    state->llm_model);
  return nullptr;
}

TRITONSERVER_Error* TRITONBACKEND_ModelFinalize(TRITONBACKEND_Model* model) {
  void* vstate;
  RETURN_IF_ERROR(TRITONBACKEND_ModelState(model, &vstate));
  auto* state = static_cast<ModelState*>(vstate);
  if (state->allocator) TRITONSERVER_ResponseAllocatorDelete(state->allocator);
  delete state;
  return nullptr;
}

TRITONSERVER_Error* TRITONBACKEND_ModelInstanceExecute(TRITONBACKEND_ModelInstance* instance,
                                                       TRITONBACKEND_Request** requests, const uint32_t count) {
  static thread_local bool named = false;
  if (!named) {  // `top -H` / benchmarks find this model's CPU time by the thread's name
    pthread_setname_np(pthread_self(), "nim_detokenize");
    named = true;
  }
  TRITONBACKEND_Model* model;
  RETURN_IF_ERROR(TRITONBACKEND_ModelInstanceModel(instance, &model));
  void* vstate;
  RETURN_IF_ERROR(TRITONBACKEND_ModelState(model, &vstate));
  auto* state = static_cast<ModelState*>(vstate);

  const uint64_t start = NowNs();
  std::vector<int64_t> shape;
  std::vector<std::string> texts;
  for (uint32_t r = 0; r < count; ++r) {
    TRITONBACKEND_Request* request = requests[r];
    const uint64_t req_start = NowNs();
    const char* id = "";
    bool cancelled = false, has_key = false;
    uint64_t stream_key = 0;
    TRITONSERVER_Error* err = TRITONBACKEND_RequestId(request, &id);
    if (!err) err = ReadStreamKey(request, &has_key, &stream_key);
    if (!id) id = "";
    // a stream's state: by its key when tensorrt_llm gave one, else by the request id
    const std::string key = has_key ? "k" + std::to_string(stream_key) : std::string(id);
    if (!err) err = TRITONBACKEND_RequestIsCancelled(request, &cancelled);
    if (!err && cancelled) {
      bool first = false;
      if (!key.empty()) {
        std::lock_guard<std::mutex> lock(state->mu);
        first = state->MarkCancelled(key);
      }
      // once per stream: its later steps arrive cancelled too. They are still answered with their text: Triton 2.51
      // never completes an ensemble request one of whose decoupled steps answered an error (it stays in flight
      // until the exit timeout runs out at shutdown).
      if (first) SendStop(state, id, has_key, stream_key);
    }
    if (!err) err = DecodeRequest(state, request, key.c_str(), start, &shape, &texts);
    TRITONBACKEND_Response* response;
    TRITONSERVER_Error* rerr = TRITONBACKEND_ResponseNew(&response, request);
    if (!rerr && !err) err = FillOutput(response, shape, texts);
    // Triton's statistics: compute_infer is this backend's own work; compute_output is the response's way
    // out, which Triton runs on this thread inside ResponseSend (the ensemble's next step, gRPC, ...).
    const uint64_t compute_end = NowNs();
    if (!rerr) rerr = TRITONBACKEND_ResponseSend(response, RESPONSE_COMPLETE_FINAL, err);
    if (rerr) {
      LOG(LOG_ERROR, std::string("nim_detokenizer: cannot respond: ") + TRITONSERVER_ErrorMessage(rerr));
      TRITONSERVER_ErrorDelete(rerr);
    }
    TRITONSERVER_Error* serr = TRITONBACKEND_ModelInstanceReportStatistics(instance, request, err == nullptr, req_start,
                                                                           req_start, compute_end, NowNs());
    if (serr) TRITONSERVER_ErrorDelete(serr);
    if (err) TRITONSERVER_ErrorDelete(err);
    if (TRITONSERVER_Error* e = TRITONBACKEND_RequestRelease(request, REQUEST_RELEASE_ALL)) TRITONSERVER_ErrorDelete(e);
  }
  const uint64_t end = NowNs();
  {
    std::lock_guard<std::mutex> lock(state->mu);
    state->Sweep(end);
  }
  TRITONSERVER_Error* e = TRITONBACKEND_ModelInstanceReportBatchStatistics(instance, count, start, start, end, end);
  if (e) TRITONSERVER_ErrorDelete(e);
  return nullptr;
}

}  // extern "C"
