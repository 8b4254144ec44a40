// Tokenizer-aware step segmenter: finds the agent tags in the byte stream of token-id sequences.
//
// A `TokenTable` maps every token id to the bytes it contributes to the text (built once per tokenizer by
// `stepsearch.rollout.segmenter.TagTable.from_tokenizer`). `segment_sequence` streams a sequence's token bytes
// through a small automaton over the eight tags, so a tag split across tokens or fused with text inside one
// token is found where it is, and maps every tag back to the tokens holding its first and last byte. The
// semantics (pairing, masks, step ends, answer, format) are specified in stepsearch/rollout/segmenter.py; this
// file is their fast implementation and the Python reference pins it by property tests.
//
// No Python, no libtorch: the pybind11 bindings live in bindings.cpp, the unit tests in tests/.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace stepsearch {

// Tag kinds, in the order of `kTagNames` (the Python side relies on this order).
enum TagKind : uint8_t {
  kThinkOpen = 0,
  kThinkClose,
  kSearchOpen,
  kSearchClose,
  kInformationOpen,
  kInformationClose,
  kAnswerOpen,
  kAnswerClose,
  kNumTagKinds,
};

extern const char* const kTagNames[kNumTagKinds];

// Token id -> bytes. A token flagged `strip_leading_space` drops its first byte (a space) when it is the first
// token of a sequence: WordPiece and Metaspace decoders put no space before the first word.
class TokenTable {
 public:
  // Throws std::invalid_argument when the two vectors differ in length or a flagged token does not start with
  // a space.
  TokenTable(const std::vector<std::string>& token_bytes, const std::vector<uint8_t>& strip_leading_space);

  int64_t size() const { return static_cast<int64_t>(entries_.size()); }
  // The bytes of `token_id` at position `position` of a sequence. `token_id` must be in [0, size()).
  std::string_view bytes(int32_t token_id, int64_t position) const {
    const Entry& entry = entries_[token_id];
    const uint32_t skip = (position == 0 && entry.strip_leading_space) ? 1u : 0u;
    return std::string_view(blob_.data() + entry.begin + skip, entry.length - skip);
  }

  // Everything the scan needs about one token, packed so the common case is a single load.
  struct Entry {
    uint64_t begin;               // offset of the token's bytes in blob_
    uint32_t length;
    uint8_t strip_leading_space;
    uint8_t has_open_bracket;     // 0: no '<' byte, so outside a partial tag the token cannot start or continue one
  };
  const Entry& entry(int32_t token_id) const { return entries_[token_id]; }

 private:
  std::string blob_;
  std::vector<Entry> entries_;
};

// One tag occurrence: its kind, the tokens holding its first and last byte, its bytes [start_byte, end_byte).
struct Tag {
  uint8_t kind;
  int64_t start_token;
  int64_t end_token;
  int64_t start_byte;
  int64_t end_byte;
};

// Segmentation of one sequence. Strings are raw bytes (possibly invalid UTF-8, not stripped): the caller decodes
// them with replacement and strips them, as the Python reference does.
struct SequenceResult {
  std::vector<Tag> tags;
  std::vector<int64_t> step_ends;        // token completing each `</search>` followed by an information block
  std::vector<int64_t> step_query;       // per step: index into `queries`, -1 when the `</search>` is unpaired
  std::vector<std::string> queries;      // content of each paired search block
  bool has_answer = false;
  std::string answer;                    // content of the last answer block (when has_answer)
  bool valid_format = false;
  int64_t num_bytes = 0;

  void clear();
};

// Reusable per-thread buffers, so a batch does not allocate per sequence.
struct Scratch {
  std::vector<int64_t> token_starts;     // byte offset of each token, plus the total at the end
  std::vector<size_t> answer_tags;       // indices of the answer tags that count (outside information blocks)
};

// The token ranges [start[k], end[k]) the environment inserted into one sequence, sorted and disjoint. With
// `given` false the text rule applies instead (information blocks are found by their tags).
struct InsertedSpans {
  bool given = false;
  const int64_t* start = nullptr;
  const int64_t* end = nullptr;
  int64_t count = 0;
};

// Segments `ids[0..length)`; writes 0/1 into `loss_mask[0..length)`. Ids must already be checked against the
// table (see `first_out_of_range`), spans against the length (see `check_spans`).
void segment_sequence(const TokenTable& table, const int32_t* ids, int64_t length, const InsertedSpans& inserted,
                      uint8_t* loss_mask, SequenceResult& result, Scratch& scratch);

// Index of the first span that is empty, unsorted, overlapping or outside [0, length), or -1 when all are valid.
int64_t check_spans(const InsertedSpans& inserted, int64_t length);

// Index of the first id outside [0, table_size), or -1 when all are valid.
int64_t first_out_of_range(const int32_t* ids, int64_t length, int64_t table_size);

// True when `bytes` decodes (UTF-8 with replacement) to text made only of characters Python's str.isspace
// accepts; the empty string counts as whitespace.
bool is_python_whitespace(std::string_view bytes);

}  // namespace stepsearch
