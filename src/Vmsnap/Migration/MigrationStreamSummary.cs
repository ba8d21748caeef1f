namespace Vmsnap.Migration;

/// <summary>
/// Says what a stream holds (<see cref="MigrationStreamInfo"/>) from its records, in stream order: the ones read, or
/// the ones a <see cref="MigrationRecordWriter"/> wrote (with their offsets in its output).
/// </summary>
internal sealed class MigrationStreamSummary
{
    private readonly List<MigrationSectionInfo> _sections = new();
    private readonly List<(DeviceSectionRecord Section, long Offset)> _early = new();
    private ConfigurationRecord? _configuration;
    private RamStartRecord? _ram;
    private long _start;
    private long _ramOffset;
    private int _ramRecords;
    private long _ramBytes;
    private bool _ramEnding;
    private long[] _pages = [];
    private long[] _zeroPages = [];
    private long _deviceStateOffset = -1;
    private string? _problem;
    private VmDescription? _description;
    private long _end;

    public void Add(MigrationRecord record) => Add(record, record.Offset, record.Length);

    /// <summary>Counts <paramref name="record"/>, which lies at <paramref name="offset"/> and takes <paramref name="length"/> bytes.</summary>
    public void Add(MigrationRecord record, long offset, long length)
    {
        switch (record)
        {
            case StreamHeaderRecord:
                _start = offset;
                break;
            case ConfigurationRecord configuration:
                _configuration = configuration;
                _sections.Add(new MigrationSectionInfo(MigrationSectionKind.Configuration, -1, "configuration", 0, 1, offset, 1, length));
                break;
            case RamStartRecord start:
                _ram = start;
                _ramOffset = offset;
                _ramRecords = 1;
                _ramBytes = length;
                _pages = new long[start.Blocks.Count];
                _zeroPages = new long[start.Blocks.Count];
                break;
            case RamSectionRecord section:
                _ramRecords++;
                _ramBytes += length;
                _ramEnding = section.Type == MigrationFormat.SectionEnd;
                break;
            case RamPagesRecord pages:
                _pages[pages.Block] += pages.PageCount;
                if (!pages.Placed) _ramBytes += length;
                break;
            case RamZeroPagesRecord zero:
                _zeroPages[zero.Block] += zero.PageCount;
                if (!zero.Placed) _ramBytes += length;
                break;
            case RamSectionFooterRecord:
                _ramBytes += length;
                if (_ramEnding)
                    _sections.Add(new MigrationSectionInfo(MigrationSectionKind.Ram, _ram!.SectionId, MigrationFormat.RamSectionName, _ram.Instance,
                        _ram.Version, _ramOffset, _ramRecords, _ramBytes));
                break;
            case DeviceSectionRecord section:
                if (section.Kind == MigrationSectionKind.EarlySetup) _early.Add((section, offset));
                else DeviceStateAt(offset);
                _sections.Add(new MigrationSectionInfo(section.Kind, section.SectionId, section.Name, section.Instance, section.Version, offset, 1, length));
                break;
            case CommandRecord command:
                _sections.Add(new MigrationSectionInfo(MigrationSectionKind.Command, command.Command,
                    command.Command == MigrationFormat.CommandSwitchoverStart ? "SWITCHOVER_START" : MigrationFormat.DescribeCommand(command.Command),
                    0, 0, offset, 1, length));
                break;
            case UnwalkedDeviceStateRecord unwalked:
                DeviceStateAt(offset);
                _problem = unwalked.Problem;
                break;
            case EofRecord:
                DeviceStateAt(offset);
                break;
            case VmDescriptionRecord description:
                _description = description.Description;
                _end = offset + length;
                break;
        }
    }

    /// <summary>Pages a writer encoded itself: <paramref name="dataPages"/> PAGE and <paramref name="zeroPages"/> ZERO records of <paramref name="bytes"/> bytes in all.</summary>
    public void AddEncodedPages(int block, long dataPages, long zeroPages, long bytes)
    {
        _pages[block] += dataPages;
        _zeroPages[block] += zeroPages;
        _ramBytes += bytes;
    }

    private void DeviceStateAt(long offset)
    {
        if (_deviceStateOffset < 0) _deviceStateOffset = offset;
    }

    /// <summary>What the whole stream held (after its VM description).</summary>
    public MigrationStreamInfo ToInfo()
    {
        VmDescription description = _description ?? throw new InvalidOperationException("the stream's records did not reach its VM description");
        string? problem = _problem;
        foreach (var (section, offset) in _early) problem ??= DeviceStateTail.CheckEarlySection(section, offset, description);
        var blocks = new RamBlockSummary[_ram?.Blocks.Count ?? 0];
        for (int i = 0; i < blocks.Length; i++)
        {
            RamBlockInfo block = _ram!.Blocks[i];
            MappedRamPlacement? placed = _ram.Placements?[i];
            blocks[i] = new RamBlockSummary(block.Id, block.Length, _pages[i], _zeroPages[i], placed?.BitmapOffset, placed?.PagesOffset);
        }
        return new MigrationStreamInfo(_configuration?.MachineType, _sections.OrderBy(s => s.Offset).ToArray(), blocks,
            description.ToDeviceInfos(), _end - _start, _end - _deviceStateOffset, problem, _configuration?.Capabilities ?? [],
            description.HasConfiguration);
    }
}
