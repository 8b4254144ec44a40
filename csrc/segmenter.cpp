// Step segmenter core: the tag automaton, the token -> byte mapping and the block rules (see segmenter.h).
#include "segmenter.h"

#include <algorithm>
#include <array>
#include <climits>
#include <cstring>
#include <stdexcept>

namespace stepsearch {

const char* const kTagNames[kNumTagKinds] = {
    "<think>", "</think>", "<search>", "</search>", "<information>", "</information>", "<answer>", "</answer>",
};

namespace {

// Aho-Corasick automaton over the eight tags, as a dense table. Every tag starts with '<' and holds no other
// '<', so a mismatch falls back to the root, or to the '<' state when the mismatching byte is itself a '<'.
class TagAutomaton {
 public:
  static constexpr uint8_t kRoot = 0;
  static constexpr uint8_t kNoTag = 0xff;

  TagAutomaton() {
    // Trie nodes first; the dense transitions are completed afterwards.
    std::vector<std::array<int, 256>> children(1);
    children[0].fill(-1);
    accept_.assign(1, kNoTag);
    for (int kind = 0; kind < kNumTagKinds; ++kind) {
      int node = 0;
      for (const char* c = kTagNames[kind]; *c != '\0'; ++c) {
        const auto byte = static_cast<uint8_t>(*c);
        if (children[node][byte] < 0) {
          children[node][byte] = static_cast<int>(children.size());
          children.emplace_back();
          children.back().fill(-1);
          accept_.push_back(kNoTag);
        }
        node = children[node][byte];
      }
      accept_[node] = static_cast<uint8_t>(kind);
    }
    const int bracket = children[0][static_cast<uint8_t>('<')];
    open_bracket_state_ = static_cast<uint8_t>(bracket);
    next_.resize(children.size());
    for (size_t node = 0; node < children.size(); ++node) {
      for (int byte = 0; byte < 256; ++byte) {
        const int child = children[node][byte];
        next_[node][byte] = static_cast<uint8_t>(child >= 0 ? child : (byte == '<' ? bracket : kRoot));
      }
    }
  }

  uint8_t next(uint8_t state, uint8_t byte) const { return next_[state][byte]; }
  uint8_t accepted(uint8_t state) const { return accept_[state]; }
  uint8_t open_bracket_state() const { return open_bracket_state_; }

 private:
  std::vector<std::array<uint8_t, 256>> next_;
  std::vector<uint8_t> accept_;
  uint8_t open_bracket_state_ = 0;
};

const TagAutomaton& automaton() {
  static const TagAutomaton instance;
  return instance;
}

bool is_ascii_whitespace(uint8_t byte) {
  return byte == ' ' || byte == '\t' || byte == '\n' || byte == '\r' || byte == '\v' || byte == '\f';
}

// True for the bytes that occur in UTF-8 encodings of Python whitespace (see is_python_whitespace).
bool may_be_in_whitespace(uint8_t byte) {
  return is_ascii_whitespace(byte) || (byte >= 0x1c && byte <= 0x1f) || byte >= 0x80;
}

// Bytes [begin, end) of a sequence's stream, read token by token (the stream itself is never materialised).
class StreamReader {
 public:
  StreamReader(const TokenTable& table, const int32_t* ids, const std::vector<int64_t>& token_starts,
               int64_t length)
      : table_(table), ids_(ids), starts_(token_starts), length_(length) {}

  // Calls `visit(std::string_view piece)` on consecutive pieces of [begin, end) until it returns false.
  template <typename Visit>
  void for_each_piece(int64_t begin, int64_t end, Visit visit) const {
    if (begin >= end) return;
    // The last token starting at or before `begin` holds it (empty tokens at the same offset come earlier).
    int64_t token = std::upper_bound(starts_.begin(), starts_.begin() + length_ + 1, begin) - starts_.begin() - 1;
    int64_t position = begin;
    while (position < end && token < length_) {
      const std::string_view bytes = table_.bytes(ids_[token], token);
      const int64_t offset = position - starts_[token];
      const int64_t take = std::min<int64_t>(static_cast<int64_t>(bytes.size()) - offset, end - position);
      if (take > 0) {
        if (!visit(bytes.substr(static_cast<size_t>(offset), static_cast<size_t>(take)))) return;
        position += take;
      }
      ++token;
    }
  }

  std::string copy(int64_t begin, int64_t end) const {
    std::string out;
    for_each_piece(begin, end, [&out](std::string_view piece) {
      out.append(piece.data(), piece.size());
      return true;
    });
    return out;
  }

  // `stepsearch::is_python_whitespace` of bytes [begin, end), stopping at the first byte that cannot be part of a
  // whitespace character (a whitespace character may straddle two tokens, so candidates are collected first).
  bool is_python_whitespace(int64_t begin, int64_t end) const {
    std::string candidate;
    bool possible = true;
    for_each_piece(begin, end, [&](std::string_view piece) {
      for (const char c : piece) {
        if (!may_be_in_whitespace(static_cast<uint8_t>(c))) {
          possible = false;
          return false;
        }
      }
      candidate.append(piece.data(), piece.size());
      return true;
    });
    return possible && stepsearch::is_python_whitespace(candidate);
  }

  bool all_ascii_whitespace(int64_t begin, int64_t end) const {
    bool all = true;
    for_each_piece(begin, end, [&all](std::string_view piece) {
      for (const char c : piece) {
        if (!is_ascii_whitespace(static_cast<uint8_t>(c))) {
          all = false;
          return false;
        }
      }
      return true;
    });
    return all;
  }

 private:
  const TokenTable& table_;
  const int32_t* ids_;
  const std::vector<int64_t>& starts_;
  int64_t length_;
};

// Streams the token bytes through the automaton: fills `token_starts` (length + 1 entries) and the tag list.
void scan_tags(const TokenTable& table, const int32_t* ids, int64_t length, std::vector<int64_t>& token_starts,
               std::vector<Tag>& tags) {
  const TagAutomaton& dfa = automaton();
  token_starts.resize(static_cast<size_t>(length) + 1);
  int64_t* starts = token_starts.data();
  int64_t position = 0;
  uint8_t state = TagAutomaton::kRoot;
  int64_t candidate_token = 0;  // token and byte of the '<' that started the partial tag
  int64_t candidate_byte = 0;
  for (int64_t token = 0; token < length; ++token) {
    const TokenTable::Entry& entry = table.entry(ids[token]);
    starts[token] = position;
    if (state == TagAutomaton::kRoot && !entry.has_open_bracket) {
      // The hot path: most tokens hold no '<', and only a token's length matters to the stream.
      position += entry.length - ((token == 0 && entry.strip_leading_space) ? 1 : 0);
      continue;
    }
    const std::string_view bytes = table.bytes(ids[token], token);
    for (size_t k = 0; k < bytes.size(); ++k) {
      state = dfa.next(state, static_cast<uint8_t>(bytes[k]));
      if (state == dfa.open_bracket_state()) {
        candidate_token = token;
        candidate_byte = position + static_cast<int64_t>(k);
      } else if (dfa.accepted(state) != TagAutomaton::kNoTag) {
        tags.push_back(Tag{dfa.accepted(state), candidate_token, token, candidate_byte,
                           position + static_cast<int64_t>(k) + 1});
        state = TagAutomaton::kRoot;
      }
    }
    position += static_cast<int64_t>(bytes.size());
  }
  starts[length] = position;
}

}  // namespace

TokenTable::TokenTable(const std::vector<std::string>& token_bytes, const std::vector<uint8_t>& strip_leading_space) {
  if (token_bytes.size() != strip_leading_space.size()) {
    throw std::invalid_argument("TokenTable: " + std::to_string(token_bytes.size()) + " tokens but " +
                                std::to_string(strip_leading_space.size()) + " strip flags");
  }
  size_t total = 0;
  for (const auto& bytes : token_bytes) total += bytes.size();
  blob_.reserve(total);
  entries_.reserve(token_bytes.size());
  for (size_t id = 0; id < token_bytes.size(); ++id) {
    const std::string& bytes = token_bytes[id];
    const bool strip = strip_leading_space[id] != 0;
    if (strip && (bytes.empty() || bytes[0] != ' ')) {
      throw std::invalid_argument("TokenTable: token " + std::to_string(id) +
                                  " is flagged to drop a leading space but does not start with one");
    }
    if (bytes.size() > UINT32_MAX) throw std::invalid_argument("TokenTable: token " + std::to_string(id) + " too long");
    entries_.push_back(Entry{blob_.size(), static_cast<uint32_t>(bytes.size()), static_cast<uint8_t>(strip),
                             static_cast<uint8_t>(bytes.find('<') != std::string::npos)});
    blob_.append(bytes);
  }
}

void SequenceResult::clear() {
  tags.clear();
  step_ends.clear();
  step_query.clear();
  queries.clear();
  has_answer = false;
  answer.clear();
  valid_format = false;
  num_bytes = 0;
}

int64_t first_out_of_range(const int32_t* ids, int64_t length, int64_t table_size) {
  for (int64_t i = 0; i < length; ++i) {
    if (ids[i] < 0 || ids[i] >= table_size) return i;
  }
  return -1;
}

bool is_python_whitespace(std::string_view bytes) {
  // The UTF-8 encodings of the non-ASCII characters for which Python's str.isspace is true. UTF-8 encodings are
  // unique, so matching these byte strings is the same as decoding; anything else (including invalid bytes, which
  // decode to U+FFFD) is not whitespace.
  static const char* const kMultiByteSpaces[] = {
      "\xc2\x85", "\xc2\xa0", "\xe1\x9a\x80", "\xe2\x80\x80", "\xe2\x80\x81", "\xe2\x80\x82",
      "\xe2\x80\x83", "\xe2\x80\x84", "\xe2\x80\x85", "\xe2\x80\x86", "\xe2\x80\x87", "\xe2\x80\x88",
      "\xe2\x80\x89", "\xe2\x80\x8a", "\xe2\x80\xa8", "\xe2\x80\xa9", "\xe2\x80\xaf", "\xe2\x81\x9f",
      "\xe3\x80\x80",
  };
  size_t i = 0;
  while (i < bytes.size()) {
    const auto byte = static_cast<uint8_t>(bytes[i]);
    if (is_ascii_whitespace(byte) || (byte >= 0x1c && byte <= 0x1f)) {
      ++i;
      continue;
    }
    bool matched = false;
    for (const char* space : kMultiByteSpaces) {
      const size_t n = std::strlen(space);
      if (bytes.compare(i, n, space) == 0) {
        i += n;
        matched = true;
        break;
      }
    }
    if (!matched) return false;
  }
  return true;
}

int64_t check_spans(const InsertedSpans& inserted, int64_t length) {
  int64_t previous_end = 0;
  for (int64_t k = 0; k < inserted.count; ++k) {
    if (inserted.start[k] < previous_end || inserted.start[k] >= inserted.end[k] || inserted.end[k] > length) {
      return k;
    }
    previous_end = inserted.end[k];
  }
  return -1;
}

namespace {

bool whitespace_only_token(const TokenTable& table, const int32_t* ids, int64_t token) {
  const std::string_view bytes = table.bytes(ids[token], token);
  if (bytes.empty()) return false;
  for (const char c : bytes) {
    if (!is_ascii_whitespace(static_cast<uint8_t>(c))) return false;
  }
  return true;
}

// Text rule: tags find the information blocks; a whitespace-only token on either side belongs to the block (the
// agent loop inserts "\n" on both sides).
void text_rule(const TokenTable& table, const int32_t* ids, int64_t length, const StreamReader& reader,
               uint8_t* loss_mask, SequenceResult& result, Scratch& scratch) {
  const std::vector<Tag>& tags = result.tags;
  auto mask_block = [&](int64_t first, int64_t last) {
    if (first > 0 && whitespace_only_token(table, ids, first - 1)) --first;
    if (last + 1 < length && whitespace_only_token(table, ids, last + 1)) ++last;
    std::memset(loss_mask + first, 0, static_cast<size_t>(last - first + 1));
  };
  bool in_information = false;
  int64_t information_first_token = 0;
  int64_t open_search = -1;  // index of the unclosed `<search>` tag, if any
  for (size_t index = 0; index < tags.size(); ++index) {
    const Tag& tag = tags[index];
    if (in_information) {
      if (tag.kind == kInformationClose) {
        mask_block(information_first_token, tag.end_token);
        in_information = false;
      }
      continue;
    }
    switch (tag.kind) {
      case kInformationOpen:
        in_information = true;
        information_first_token = tag.start_token;
        open_search = -1;
        break;
      case kSearchOpen:
        open_search = static_cast<int64_t>(index);
        break;
      case kSearchClose: {
        int64_t query_index = -1;
        if (open_search >= 0) {
          query_index = static_cast<int64_t>(result.queries.size());
          result.queries.push_back(reader.copy(tags[open_search].end_byte, tag.start_byte));
          open_search = -1;
        }
        const bool followed_by_information = index + 1 < tags.size() &&
                                             tags[index + 1].kind == kInformationOpen &&
                                             reader.all_ascii_whitespace(tag.end_byte, tags[index + 1].start_byte);
        if (followed_by_information) {
          result.step_ends.push_back(tag.end_token);
          result.step_query.push_back(query_index);
        }
        break;
      }
      case kAnswerOpen:
      case kAnswerClose:
        scratch.answer_tags.push_back(index);
        break;
      default:
        break;
    }
  }
  if (in_information) mask_block(information_first_token, length - 1);
}

// Span rule: the inserted spans are the information blocks; a step is a span right after the token completing a
// generated `</search>`.
void span_rule(const InsertedSpans& inserted, const StreamReader& reader, uint8_t* loss_mask,
               SequenceResult& result, Scratch& scratch) {
  for (int64_t k = 0; k < inserted.count; ++k) {
    std::memset(loss_mask + inserted.start[k], 0, static_cast<size_t>(inserted.end[k] - inserted.start[k]));
  }
  const std::vector<Tag>& tags = result.tags;
  int64_t next_span = 0;
  int64_t open_search = -1;
  int64_t last_close_token = -1;  // end token and query of the latest generated `</search>`, -1 when none
  int64_t last_close_query = -1;
  auto enter_spans_up_to = [&](int64_t token) {
    while (next_span < inserted.count && inserted.start[next_span] <= token) {
      if (last_close_token >= 0 && last_close_token == inserted.start[next_span] - 1) {
        result.step_ends.push_back(last_close_token);
        result.step_query.push_back(last_close_query);
      }
      last_close_token = -1;
      open_search = -1;
      ++next_span;
    }
  };
  for (size_t index = 0; index < tags.size(); ++index) {
    const Tag& tag = tags[index];
    enter_spans_up_to(tag.start_token);
    if (next_span > 0 && tag.start_token < inserted.end[next_span - 1]) continue;  // retrieved text is data
    switch (tag.kind) {
      case kSearchOpen:
        open_search = static_cast<int64_t>(index);
        break;
      case kSearchClose:
        last_close_query = -1;
        if (open_search >= 0) {
          last_close_query = static_cast<int64_t>(result.queries.size());
          result.queries.push_back(reader.copy(tags[open_search].end_byte, tag.start_byte));
          open_search = -1;
        }
        last_close_token = tag.end_token;
        break;
      case kAnswerOpen:
      case kAnswerClose:
        scratch.answer_tags.push_back(index);
        break;
      default:
        break;
    }
  }
  enter_spans_up_to(INT64_MAX);
}

}  // namespace

void segment_sequence(const TokenTable& table, const int32_t* ids, int64_t length, const InsertedSpans& inserted,
                      uint8_t* loss_mask, SequenceResult& result, Scratch& scratch) {
  result.clear();
  scratch.answer_tags.clear();
  std::vector<int64_t>& starts = scratch.token_starts;
  scan_tags(table, ids, length, starts, result.tags);
  result.num_bytes = starts[length];
  const StreamReader reader(table, ids, starts, length);
  if (length > 0) std::memset(loss_mask, 1, static_cast<size_t>(length));
  if (inserted.given) {
    span_rule(inserted, reader, loss_mask, result, scratch);
  } else {
    text_rule(table, ids, length, reader, loss_mask, result, scratch);
  }

  // The answer: among the answer tags outside information blocks, a block is an `<answer>` whose next answer tag
  // is an `</answer>`; the last block holds the answer; the format is valid when that answer is not empty (after
  // stripping) and only whitespace follows the block.
  const Tag* last_open = nullptr;
  const Tag* block_open = nullptr;
  const Tag* block_close = nullptr;
  for (const size_t index : scratch.answer_tags) {
    const Tag& tag = result.tags[index];
    if (tag.kind == kAnswerOpen) {
      last_open = &tag;
    } else {
      if (last_open != nullptr) {
        block_open = last_open;
        block_close = &tag;
      }
      last_open = nullptr;
    }
  }
  if (block_close != nullptr) {
    result.has_answer = true;
    result.answer = reader.copy(block_open->end_byte, block_close->start_byte);
    result.valid_format = !stepsearch::is_python_whitespace(result.answer) &&
                          reader.is_python_whitespace(block_close->end_byte, result.num_bytes);
  }
}

}  // namespace stepsearch
