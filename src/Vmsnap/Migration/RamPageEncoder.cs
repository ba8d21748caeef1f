using System.Text;
using Vmsnap.VmState;
using Vmsnap.VmState.LowLevel;

namespace Vmsnap.Migration;

/// <summary>
/// Writes RAM pages as QEMU's migration stream carries them (inside a RAM section part; the
/// caller writes the section framing): per 4 KiB page a big-endian 64-bit header holding the
/// page's offset in its RAM block OR'ed with flags, the block's id string when the block differs
/// from the previous page's, then the page (PAGE) or a single fill byte 0 (ZERO).
/// </summary>
internal sealed class RamPageEncoder
{
    internal const int PageSize = ZeroPage.Size;

    /// <summary>Header flag: a page of one repeated byte (here always 0) follows as that byte.</summary>
    internal const ulong FlagZero = 0x02;

    /// <summary>Header flag: the page's bytes follow.</summary>
    internal const ulong FlagPage = 0x08;

    /// <summary>Header flag: same RAM block as the previous page, no id string.</summary>
    internal const ulong FlagContinue = 0x20;

    private readonly VmStateWriter _writer;
    private string? _block;     // block of the previous page (by name), or null
    private byte[] _blockId = [];
    private bool _continue;     // the next page may say CONTINUE instead of repeating the id

    internal RamPageEncoder(VmStateWriter writer)
    {
        ArgumentNullException.ThrowIfNull(writer);
        _writer = writer;
    }

    /// <summary>Told of each page encoded: its offset in its block and where its data lies in the output (-1 for a ZERO record).</summary>
    internal Action<long, long>? Placed { get; set; }

    /// <summary>Pages encoded (zero pages included).</summary>
    internal long Pages { get; private set; }

    /// <summary>Pages encoded as ZERO.</summary>
    internal long ZeroPages { get; private set; }

    /// <summary>
    /// Encodes <paramref name="pages"/> (whole 4 KiB pages) of RAM block <paramref name="blockId"/>
    /// starting at <paramref name="blockOffset"/> in that block. In gather mode non-zero pages are
    /// referenced, not copied: the memory must stay unchanged until the writer's next flush, and
    /// <paramref name="mayFree"/> is disposed once the last of them is written.
    /// </summary>
    internal void EncodePages(string blockId, long blockOffset, ReadOnlyMemory<byte> pages, IDisposable? mayFree = null)
    {
        ArgumentNullException.ThrowIfNull(blockId);
        CheckPages(blockOffset, pages);
        if (blockId != _block) SetBlock(blockId);
        Encode(blockOffset, pages, mayFree);
    }

    /// <summary>As <see cref="EncodePages(string, long, ReadOnlyMemory{byte}, IDisposable?)"/> for a block named by its id string's bytes.</summary>
    internal void EncodePages(byte[] blockId, long blockOffset, ReadOnlyMemory<byte> pages, IDisposable? mayFree = null)
    {
        CheckPages(blockOffset, pages);
        SetBlock(blockId);
        Encode(blockOffset, pages, mayFree);
    }

    private static void CheckPages(long blockOffset, ReadOnlyMemory<byte> pages)
    {
        if (pages.Length % PageSize != 0)
            throw new ArgumentException($"RAM pages come in whole {PageSize}-byte pages; got {pages.Length} bytes", nameof(pages));
        if (blockOffset < 0 || blockOffset % PageSize != 0)
            throw new ArgumentOutOfRangeException(nameof(blockOffset), blockOffset, $"a page offset must be a non-negative multiple of {PageSize}");
    }

    private void Encode(long blockOffset, ReadOnlyMemory<byte> pages, IDisposable? mayFree)
    {
        bool referenced = false;
        for (int at = 0; at < pages.Length; at += PageSize, blockOffset += PageSize)
        {
            ReadOnlyMemory<byte> page = pages.Slice(at, PageSize);
            bool zero = ZeroPage.IsZero(page.Span);
            PutHeader((ulong)blockOffset | (zero ? FlagZero : FlagPage));
            Placed?.Invoke(blockOffset, zero ? -1 : _writer.Tell());
            if (zero)
            {
                _writer.PutByte(0);
                ZeroPages++;
            }
            else
            {
                _writer.PutBufferAsync(page);
                referenced = true;
            }
            Pages++;
        }
        if (mayFree is null) return;
        if (referenced) _writer.ReleaseWhenWritten(mayFree);
        else mayFree.Dispose();
    }

    /// <summary>Encodes <paramref name="count"/> zero pages of block <paramref name="blockId"/> from <paramref name="blockOffset"/> as ZERO records.</summary>
    internal void EncodeZeroPages(byte[] blockId, long blockOffset, long count)
    {
        if (blockOffset < 0 || blockOffset % PageSize != 0)
            throw new ArgumentOutOfRangeException(nameof(blockOffset), blockOffset, $"a page offset must be a non-negative multiple of {PageSize}");
        SetBlock(blockId);
        for (long i = 0; i < count; i++, blockOffset += PageSize)
        {
            PutHeader((ulong)blockOffset | FlagZero);
            Placed?.Invoke(blockOffset, -1);
            _writer.PutByte(0);
            ZeroPages++;
            Pages++;
        }
    }

    /// <summary>The next page repeats its block id string (QEMU does so at the start of every RAM section part).</summary>
    internal void ResetBlock() => _continue = false;

    private void SetBlock(string blockId)
    {
        SetBlock(Encoding.UTF8.GetBytes(blockId));
        _block = blockId;
    }

    /// <summary>The block of the next pages: a block other than the previous page's is named again.</summary>
    private void SetBlock(byte[] id)
    {
        if (id.Length is 0 or > 255)
            throw new ArgumentException($"a RAM block id is 1 to 255 bytes long; '{Encoding.UTF8.GetString(id)}' is {id.Length}", nameof(id));
        if (id.AsSpan().SequenceEqual(_blockId)) return;
        _block = null;
        _blockId = id;
        _continue = false;
    }

    private void PutHeader(ulong header)
    {
        if (_continue)
        {
            _writer.PutBe64(header | FlagContinue);
            return;
        }
        _writer.PutBe64(header);
        RecordHeaders.WriteId(_writer, _blockId);
        _continue = true;
    }
}
